#!/usr/bin/env bash
# Set everything up, then ask the default on-device model a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/afm generate "${1:-Write a one-sentence summary of why on-device language models matter.}"
