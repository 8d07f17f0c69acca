"""The product's tasks: prompt formats and the adapter each one uses."""

from openafm.features.summarize import (
    FEATURES,
    SummaryFeature,
    clean_summary,
    feature_for,
    get_feature,
    summarize,
)

__all__ = ["FEATURES", "SummaryFeature", "clean_summary", "feature_for", "get_feature", "summarize"]
