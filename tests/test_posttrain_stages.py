"""Post-training stages on a tiny model: preference files, the reward model's fit, save/load and
refusals, the committee's sampling (resumable, deterministic) and best-of-N report, the RL run
(resume equals an uninterrupted run; micro-batched updates equal one batch) and the guarded
verifiable reward; the CLI refuses bad settings before any work."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from typer.testing import CliRunner

from openafm.cli.main import app
from openafm.eval.ifeval import IFEvalPrompt
from openafm.posttrain.committee import (
    Candidate,
    Member,
    best_of_n_report,
    constraint_pairs,
    pick_best,
    sample_committee,
)
from openafm.posttrain.constraint_prompts import guarded_reward
from openafm.posttrain.preferences import PreferenceDataError, PreferencePair, read_preferences
from openafm.posttrain.reward_model import RewardModel
from openafm.posttrain.reward_training import (
    PairFeatures,
    RewardModelError,
    RewardTrainConfig,
    cross_validate,
    length_accuracy,
    load_reward_model,
    pairwise_accuracy,
    save_reward_model,
    train_heads,
)
from tests.conftest import byte_tokenizer, make_tiny

HH = {
    "chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
    "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Use a tension wrench.",
}


def test_preference_files_are_read_in_both_layouts(tmp_path):
    path = tmp_path / "prefs.jsonl.gz"
    own = {
        "prompt": "Say hi.",
        "chosen": "hi",
        "rejected": "no",
        "strength": "slightly_better",
        "chosen_grades": {"verbosity": 1},
    }
    divergent = dict(HH, rejected="\n\nHuman: Other?\n\nAssistant: x")
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in (HH, own, divergent)) + "\n")
    first, second = read_preferences(path)  # the divergent pair is left out
    assert first.prompt == (("user", "How do I pick a lock?"),)
    assert (first.chosen, first.rejected, first.p) == (
        "I can't help with that.",
        "Use a tension wrench.",
        1.0,
    )
    assert second.p == 0.75 and second.chosen_grades == (-1, 1, -1, -1)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no preference pairs"),
        ('{"chosen": "x"}\n', ":1: missing field"),
        ("not json\n", ":1:"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "strength": "huge"}\n', "strength"),
        ('{"chosen": "plain", "rejected": "text"}\n', "transcript"),
    ],
)
def test_a_bad_preference_file_gets_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(PreferenceDataError, match=message):
        read_preferences(path)


def _separable(n: int, dim: int, seed: int = 0) -> PairFeatures:
    """Features where the chosen answer is better along one direction, plus noise."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=g)
    base = torch.randn(n, dim, generator=g)
    chosen = base + 0.5 * direction + 0.3 * torch.randn(n, dim, generator=g)
    rejected = base - 0.5 * direction + 0.3 * torch.randn(n, dim, generator=g)
    none = torch.full((n, 4), -1)
    return PairFeatures(chosen, rejected, torch.ones(n), none, none)


def test_the_heads_learn_a_separable_preference_and_generalise():
    model = make_tiny()
    features = _separable(200, model.config.dim)
    held_out = features.subset(range(150, 200))
    reward_model = RewardModel(model)
    train_heads(reward_model, features.subset(range(150)), RewardTrainConfig(steps=200))
    assert pairwise_accuracy(reward_model, held_out) > 0.9
    flipped = PairFeatures(
        features.rejected,
        features.chosen,
        features.p,
        features.rejected_grades,
        features.chosen_grades,
    )  # the labels, not the initial head, decide what is learned
    reward_model = RewardModel(model)
    train_heads(reward_model, flipped.subset(range(150)), RewardTrainConfig(steps=200))
    assert pairwise_accuracy(reward_model, held_out) < 0.1


def test_the_length_judge_and_cross_validation_by_hand():
    assert length_accuracy([10, 5, 7], [3, 9, 7], longer_wins=True) == pytest.approx(1.5 / 3)
    assert length_accuracy([10, 5, 7], [3, 9, 7], longer_wins=False) == pytest.approx(1.5 / 3)
    assert length_accuracy([10, 12], [3, 9], longer_wins=True) == 1.0
    model = make_tiny()
    features = _separable(60, model.config.dim)
    pairs = [PreferencePair((("user", "q"),), "a", "b")] * 60
    report = cross_validate(
        model,
        features,
        pairs,
        {"soft": RewardTrainConfig(steps=100)},
        ([2] * 30 + [1] * 30, [1] * 60),
        k=3,
    )
    assert report["soft"]["accuracy"] > 0.85
    assert len(report["soft"]["accuracy_folds"]) == 3
    # the longer answer wins in half the pairs, ties in the other half: 0.5 + 0.25 = 0.75
    assert report["length_only"]["accuracy"] == pytest.approx(0.75, abs=0.1)


def test_a_saved_reward_model_loads_only_on_its_base_and_tokenizer(tmp_path):
    model, tokenizer = make_tiny(), byte_tokenizer()
    reward_model = RewardModel(model)
    meta = {"base_signature": "abc", "tokenizer": tokenizer.fingerprint(), "max_tokens": 64}
    save_reward_model(reward_model, tmp_path / "rm", meta)
    loaded = load_reward_model(tmp_path / "rm", model, "abc", tokenizer)
    x = torch.randn(3, model.config.dim)
    assert torch.equal(loaded.heads(x)[0], reward_model.heads(x)[0])
    with pytest.raises(RewardModelError, match="another base"):
        load_reward_model(tmp_path / "rm", model, "xyz", tokenizer)
    with pytest.raises(RewardModelError, match="another tokenizer"):
        load_reward_model(tmp_path / "rm", model, "abc", byte_tokenizer(vocab_size=520))
    with pytest.raises(RewardModelError, match="not a reward model"):
        load_reward_model(tmp_path, model, "abc", tokenizer)


def _candidates(texts_and_finished):
    return [
        Candidate(0, "base", i, text, len(text), finished)
        for i, (text, finished) in enumerate(texts_and_finished)
    ]


def test_best_of_n_report_by_hand():
    first = _candidates([("a", True), ("b", True), ("c", False)])
    second = _candidates([("d", True), ("e", True), ("f", True)])
    # judge prefers the unfinished one in the first group (skipped), oracle truth below
    judged = [[0.2, 0.9, 5.0], [0.1, 0.0, 0.3]]
    truth = [[0.0, 1.0, 1.0], [1.0, 0.5, 0.0]]
    assert pick_best(first, judged[0]) == 1
    report = best_of_n_report([first, second], judged, truth)
    assert report["judge_best_pass_rate"] == 0.5  # first: b passes; second: f fails
    assert report["oracle_best_pass_rate"] == 1.0
    assert report["random_pass_rate"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    pairs = constraint_pairs(["p", "q"], [first, second], truth)
    assert [(p["chosen"], p["rejected"], p["strength"]) for p in pairs] == [
        ("b", "a", "significantly_better"),
        ("d", "f", "significantly_better"),
    ]
    assert pairs[0]["chosen_grades"] == {"instruction_following": 2, "verbosity": 0}


def _engine():
    from openafm.runtime import Engine

    return Engine(make_tiny(seed=3), byte_tokenizer(), tune_threads=False)


def test_committee_sampling_resumes_from_its_store_and_draws_the_same_answers(tmp_path):
    engine = _engine()
    prompts = ["one", "two", "three"]
    members = [Member.parse("base"), Member.parse("again=base")]
    store = tmp_path / "samples.jsonl"
    kwargs = dict(max_tokens=6, temperature=1.0, seed=5, max_batch=4)
    whole = sample_committee(engine, prompts, members, 2, **kwargs)
    assert [len(g) for g in whole] == [4, 4, 4]
    assert len({c.text for g in whole for c in g}) > 3  # sampled, not greedy copies
    partial = sample_committee(engine, prompts[:1], members, 2, store=store, **kwargs)
    assert partial[0] == whole[0]
    with store.open("a") as f:
        f.write('{"prompt": 1, "memb')  # a line torn by a kill
    seen = []
    resumed = sample_committee(
        engine, prompts, members, 2, store=store, on_prompt=seen.append, **kwargs
    )
    assert resumed == whole and sum(seen) == 3


def test_the_guarded_reward_floors_short_answers_and_penalises_no_end():
    lower = IFEvalPrompt(1, "x", ("change_case:english_lowercase",), ({},))
    long_lower = "this answer is entirely lower case and long enough"
    assert guarded_reward(lower, long_lower, True) == 1.0
    assert guarded_reward(lower, "ok", True) == 0.0  # too short to count
    assert guarded_reward(lower, long_lower, False) == 0.5
    capped = IFEvalPrompt(
        2, "x", ("length_constraints:number_words",), ({"relation": "less than", "num_words": 5},)
    )
    assert guarded_reward(capped, "Two words", True) == 1.0


def _rl_trainer(micro_batch: int = 4):
    from tests.test_posttrain import _trainer

    trainer, prompts = _trainer("mdloo", k=4, max_tokens=3)
    trainer.config = type(trainer.config)(**{**trainer.config.__dict__, "micro_batch": micro_batch})
    return trainer, prompts


def test_a_micro_batched_update_equals_the_whole_batch_update():
    steps = []
    for micro in (1, 16):
        trainer, prompts = _rl_trainer(micro)
        trainer.step(prompts)
        steps.append(torch.cat([t.detach().flatten() for t in trainer.adapter.parameters()]))
    # Adam moves each weight by about lr = 1e-2 per step whatever its gradient's size, so a
    # gradient at rounding level (summed in another order) may move by a little; a wrong
    # micro-batch would move most weights by about lr
    assert torch.allclose(steps[0], steps[1], atol=1e-4)


def test_an_rl_run_resumed_after_a_stop_ends_where_an_uninterrupted_run_ends(tmp_path):
    from openafm.posttrain.rl_run import RLRun, RunMismatchError, run_rl

    straight, prompts = _rl_trainer()
    full = run_rl(straight, prompts, RLRun(tmp_path / "a", 3, 2), settings_key="k")
    first, _ = _rl_trainer()
    run_rl(first, prompts, RLRun(tmp_path / "b", 2, 2), settings_key="k")
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 3, "rew')  # torn by a kill
    second, _ = _rl_trainer()
    resumed = run_rl(second, prompts, RLRun(tmp_path / "b", 3, 2), settings_key="k")
    for a, b in zip(straight.adapter.parameters(), second.adapter.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert [r["reward"] for r in resumed] == [r["reward"] for r in full]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3
    plotted = CliRunner().invoke(app, ["train", "plot", str(tmp_path / "b")])
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "b" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RunMismatchError, match="other settings"):
        run_rl(_rl_trainer()[0], prompts, RLRun(tmp_path / "b", 4, 2), settings_key="other")


def test_the_cli_refuses_bad_settings_in_one_line_before_any_work(tmp_path):
    runner = CliRunner()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"key": 1, "prompt": "hi", "instruction_id_list": [], "kwargs": []}) + "\n"
    )
    result = runner.invoke(
        app, ["posttrain", "rl", "--prompts", str(prompts), "--name", "x", "--k", "1"]
    )
    assert result.exit_code == 1 and "k >= 2" in result.output
    assert "Traceback" not in result.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = runner.invoke(
        app, ["posttrain", "rm", "train", "--data", str(empty), "--out", str(tmp_path / "rm")]
    )
    assert result.exit_code == 1 and "no preference pairs" in result.output
    assert not (tmp_path / "rm").exists()


def _one_distributed_step(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    trainer, prompts = _rl_trainer(micro_batch=2)
    stats = trainer.step(prompts)
    if rank == 0:
        params = [t.detach() for t in trainer.adapter.parameters()]
        torch.save({"params": params, "stats": stats}, out)


def test_one_rl_step_in_two_gloo_processes_equals_the_single_process_step(tmp_path):
    from tests.distributed import run_processes

    single, prompts = _rl_trainer(micro_batch=2)
    stats = single.step(prompts)
    run_processes(2, _one_distributed_step, str(tmp_path / "rank0.pt"))
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for a, b in zip(single.adapter.parameters(), saved["params"], strict=True):
        assert torch.allclose(a, b, atol=1e-5)  # steps are ~1e-2; sums differ in order only
    assert saved["stats"]["reward"] == stats["reward"]
    assert saved["stats"]["kl_to_old"] == pytest.approx(stats["kl_to_old"], abs=1e-6)


def test_mcnemar_and_the_paired_comparison_by_hand():
    from openafm.eval.paired import compare, mcnemar_exact

    before = [False] * 8 + [True] * 2 + [True] * 5
    after = [True] * 8 + [False] * 2 + [True] * 5
    test = mcnemar_exact(before, after)
    # 8 gained, 2 lost: p = 2 · (C(10,0) + C(10,1) + C(10,2)) / 2^10
    assert (test["gained"], test["lost"]) == (8, 2)
    assert test["p_value"] == pytest.approx(2 * 56 / 1024)
    rows_before = [
        {"key": i, "strict": [b, True], "loose": [True, True]} for i, b in enumerate(before)
    ]
    rows_after = [
        {"key": i, "strict": [a, True], "loose": [True, True]} for i, a in enumerate(after)
    ]
    prompt = compare(rows_before, rows_after, "prompt_strict")
    assert prompt["difference"] == pytest.approx(6 / 15)
    low, high = prompt["difference_ci"]
    assert low < 6 / 15 < high
    instruction = compare(rows_before, rows_after, "instruction_strict")
    assert instruction["difference"] == pytest.approx(6 / 30) and "mcnemar" not in instruction
    with pytest.raises(ValueError, match="share no prompt"):
        compare(rows_before, [{"key": 99, "strict": [True], "loose": [True]}], "prompt_strict")
    safety_before = [
        {"id": 1, "safe": True, "refusal": True},
        {"id": 2, "safe": False, "refusal": False},
    ]
    safety_after = [
        {"id": 1, "safe": True, "refusal": False},
        {"id": 2, "safe": False, "refusal": True},
    ]
    over = compare(safety_before, safety_after, "over_refusal")
    assert (over["prompts"], over["before"], over["after"]) == (1, 1.0, 0.0)
    violation = compare(safety_before, safety_after, "violation")
    assert (violation["prompts"], violation["before"], violation["after"]) == (1, 1.0, 0.0)
    with pytest.raises(ValueError, match="use refusal, over_refusal or violation"):
        compare(safety_before, safety_after, "prompt_strict")  # a KeyError once
    with pytest.raises(ValueError, match="use an IFEval metric"):
        compare(rows_before, rows_after, "violation")


def test_compare_reads_gzipped_rows_as_it_reads_plain_ones(tmp_path):
    flags = {"before": [False] * 6 + [True] * 4, "after": [True] * 7 + [False] * 3}
    for name, values in flags.items():
        text = "".join(
            json.dumps({"key": i, "strict": [v], "loose": [v]}) + "\n" for i, v in enumerate(values)
        )
        (tmp_path / f"{name}.jsonl").write_text(text)
        (tmp_path / f"{name}.jsonl.gz").write_bytes(gzip.compress(text.encode()))

    def compared(suffix: str) -> dict:
        files = [str(tmp_path / f"{n}.jsonl{suffix}") for n in ("before", "after")]
        result = CliRunner().invoke(app, ["eval", "compare", *files, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    plain = compared("")
    assert plain["difference"] == pytest.approx(0.3) and compared(".gz") == plain


def _constraint_file(path):
    rows = [
        {
            "key": i,
            "prompt": f"Say something about {topic}.",
            "instruction_id_list": ["change_case:english_lowercase"],
            "kwargs": [{}],
        }
        for i, topic in enumerate(["rain", "tea", "maps"], 1)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rs_and_rl_commands_run_end_to_end_on_a_tiny_model(tmp_path, tiny_dir):
    runner = CliRunner()
    prompts = _constraint_file(tmp_path / "prompts.jsonl")
    common = ["--model", str(tiny_dir), "--prompts", str(prompts)]
    refused = runner.invoke(
        app, ["posttrain", "rs", *common, "--out-dir", str(tmp_path / "x"), "--member", "nosuch"]
    )
    assert refused.exit_code == 1 and "unknown adapter" in refused.output
    assert not (tmp_path / "x" / "samples.jsonl").exists()
    rs = runner.invoke(
        app,
        ["posttrain", "rs", *common, "--out-dir", str(tmp_path / "rs"), "--k", "2",
         "--max-tokens", "6", "--json"],
    )  # fmt: skip
    assert rs.exit_code == 0, rs.output
    report = json.loads(rs.output.strip().splitlines()[-1])
    assert report["prompts"] == 3 and report["k"] == 2
    assert 0 <= report["random_pass_rate"] <= report["oracle_best_pass_rate"] <= 1
    assert len((tmp_path / "rs" / "samples.jsonl").read_text().splitlines()) == 6
    assert report["repaired_answers"] is None
    pairs = (tmp_path / "rs" / "pairs.jsonl").read_text()
    samples = (tmp_path / "rs" / "samples.jsonl").read_text()
    rejudged = runner.invoke(  # the stored samples judged again, failed answers repaired first
        app,
        [
            "posttrain",
            "rs",
            *common,
            "--out-dir",
            str(tmp_path / "rs"),
            "--k",
            "2",
            "--repair",
            "--json",
        ],
    )
    assert rejudged.exit_code == 0, rejudged.output
    assert isinstance(json.loads(rejudged.output.strip().splitlines()[-1])["repaired_answers"], int)
    assert (tmp_path / "rs" / "samples.jsonl").read_text() == samples  # nothing sampled again
    assert (tmp_path / "rs" / "pairs.jsonl").read_text() == pairs  # pairs: answers as sampled
    rl_args = ["posttrain", "rl", *common, "--name", "tiny-policy", "--iterations", "2",
               "--prompts-per-iteration", "2", "--k", "2", "--max-tokens", "4",
               "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "policy"), "--json"]  # fmt: skip
    first = runner.invoke(app, rl_args)
    assert first.exit_code == 0, first.output
    assert json.loads((tmp_path / "policy" / "adapter.json").read_text())["name"] == "tiny-policy"
    again = runner.invoke(app, rl_args)  # already complete: resumes, runs nothing more
    assert again.exit_code == 0, again.output
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_prompts_command_writes_disjoint_decontaminated_sets_ifeval_can_read(tmp_path):
    from openafm.eval import ifeval
    from tests.conftest import FIXTURES

    seeds = FIXTURES / "sft" / "self_instruct_seed_tasks_head40.jsonl"
    evaluation = FIXTURES / "ifeval" / "input_data.jsonl"
    first_ifeval = json.loads(evaluation.read_text().splitlines()[0])["prompt"]
    copied = tmp_path / "copied.json"  # an instruction copied from IFEval must be dropped
    copied.write_text(json.dumps([{"instruction": first_ifeval}]))
    result = CliRunner().invoke(
        app,
        ["posttrain", "prompts", "--instructions", str(seeds), "--instructions", str(copied),
         "--ifeval", str(evaluation), "--out-dir", str(tmp_path), "--train", "30",
         "--heldout", "10"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    train = ifeval.read_prompts(tmp_path / "train_prompts.jsonl")
    heldout = ifeval.read_prompts(tmp_path / "heldout_prompts.jsonl")
    assert (len(train), len(heldout)) == (30, 10)
    seed_texts = [json.loads(line)["instruction"] for line in seeds.read_text().splitlines()]

    def base_of(prompt: str) -> str:
        return next(s for s in seed_texts if prompt.startswith(s.strip()))

    assert not {base_of(p.prompt) for p in train} & {base_of(p.prompt) for p in heldout}
    assert all(first_ifeval[:60] not in p.prompt for p in train + heldout)
    assert all(1 <= len(p.instruction_ids) <= 3 for p in train)
