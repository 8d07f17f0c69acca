"""Post-training pieces: the losses against hand computations and the properties the seed's report
relies on (soft labels as label smoothing, zero-sum leave-one-out advantages, the MDPO KL term's
zero gradient at the rollout policy, and MDLOO = RLOO = REINFORCE-LOO for a single step); the
reward model's heads; constraint prompts and their verifiable reward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from openafm.posttrain import (
    STRENGTH_LABELS,
    grading_loss,
    kl_penalized_reward,
    leave_one_out_advantage,
    mdpo_loss,
    rloo_clipped_loss,
    sequence_logprob,
    soft_ranking_loss,
)
from openafm.posttrain.losses import response_positions, token_kl
from tests.conftest import FIXTURES

PROMPTS = FIXTURES / "ifeval" / "input_data.jsonl"


def test_soft_ranking_loss_matches_the_formula_by_hand():
    chosen, rejected = torch.tensor([2.0]), torch.tensor([0.5])
    # -0.85·log sigmoid(1.5) - 0.15·log sigmoid(-1.5); sigmoid(1.5) = 0.8175744762
    expected = 0.85 * 0.2014132779 + 0.15 * 1.7014132779
    assert soft_ranking_loss(chosen, rejected, 0.85).item() == pytest.approx(expected, abs=1e-6)
    assert soft_ranking_loss(chosen, rejected).item() == pytest.approx(0.2014132779, abs=1e-6)
    assert STRENGTH_LABELS["better"] == 0.85 and STRENGTH_LABELS["negligibly_better"] == 0.65


@pytest.mark.parametrize("p", sorted(STRENGTH_LABELS.values()))
def test_a_soft_label_stops_pushing_once_the_margin_reaches_its_log_odds(p):
    margin = torch.tensor([math.log(p / (1 - p))], requires_grad=True)
    soft_ranking_loss(margin, torch.zeros(1), p).backward()
    assert abs(margin.grad.item()) < 1e-6  # plain Bradley-Terry would still push
    hard = torch.tensor([math.log(p / (1 - p))], requires_grad=True)
    soft_ranking_loss(hard, torch.zeros(1)).backward()
    assert hard.grad.item() < -0.01


def test_grading_loss_is_cross_entropy_over_graded_heads_only():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, -1]])
    expected = -math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
    assert grading_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert grading_loss(logits, torch.tensor([[-1, -1]])).item() == 0.0


def test_leave_one_out_advantage_by_hand_and_it_sums_to_zero():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    advantage = leave_one_out_advantage(rewards)
    assert advantage[0].tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2])
    assert advantage[1].tolist() == [0.0] * 4
    assert advantage.sum(dim=-1).abs().max() < 1e-6
    with pytest.raises(ValueError, match="K >= 2"):
        leave_one_out_advantage(torch.tensor([[1.0]]))


def test_sequence_logprob_and_kl_penalized_reward_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]]))
    tokens = torch.tensor([[0, 1]])
    assert sequence_logprob(logits, tokens, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(
        math.log(0.5 * 0.6)
    )
    assert sequence_logprob(logits, tokens, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        math.log(0.5)
    )
    reward = kl_penalized_reward(
        torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), 0.1
    )
    assert reward.item() == pytest.approx(0.9)


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(4, 5, 11, generator=gen)
    tokens = torch.randint(0, 11, (4, 5), generator=gen)
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    advantages = leave_one_out_advantage(torch.randn(1, 4, generator=gen))[0]
    return old, tokens, mask, advantages


def _packed(logits, tokens, mask):
    """Log-probabilities and tokens at the response positions, and each position's response."""
    keep, rows = response_positions(mask)
    return torch.log_softmax(logits, dim=-1)[keep], tokens[keep], rows


def test_the_kl_term_has_zero_gradient_at_the_rollout_policy_and_not_after_a_step():
    old, tokens, mask, advantages = _batch()
    old_logp, picked, rows = _packed(old, tokens, mask)
    logits = old.clone().requires_grad_(True)
    token_kl(_packed(logits, tokens, mask)[0], old_logp, rows, 4).sum().backward()
    assert logits.grad.abs().max() < 1e-6
    moved = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    moved.requires_grad_(True)
    logp = _packed(moved, tokens, mask)[0]
    kl = token_kl(logp, old_logp, rows, 4)
    kl.sum().backward()
    assert (kl > 0).all() and moved.grad.abs().max() > 1e-3
    by_torch = F.kl_div(
        torch.log_softmax(old, -1), torch.log_softmax(moved, -1), log_target=True, reduction="none"
    )
    torch.testing.assert_close(kl, (by_torch.sum(-1) * mask).sum(-1))
    _, stats = mdpo_loss(logp, old_logp, picked, rows, advantages, step_size=0.5)
    assert stats["kl_to_old"] == pytest.approx(kl.mean().item(), rel=1e-5)


def test_one_step_from_the_rollout_policy_mdloo_rloo_and_reinforce_loo_coincide():
    old, tokens, mask, advantages = _batch()
    old_logp, picked, rows = _packed(old, tokens, mask)
    grads = []
    for objective in ("mdpo", "rloo", "reinforce"):
        logits = old.clone().requires_grad_(True)
        if objective == "mdpo":
            logp = _packed(logits, tokens, mask)[0]
            loss, _ = mdpo_loss(logp, old_logp, picked, rows, advantages, step_size=0.1)
        elif objective == "rloo":
            new = sequence_logprob(logits, tokens, mask)
            loss = rloo_clipped_loss(new, sequence_logprob(old, tokens, mask), advantages)
        else:
            loss = -(advantages * sequence_logprob(logits, tokens, mask)).mean()
        loss.backward()
        grads.append(logits.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[2], atol=1e-6)


def test_the_clipped_ratio_stops_the_gradient_outside_the_trust_region():
    logprob = torch.tensor([0.5, -0.5], requires_grad=True)  # ratios e^0.5 and e^-0.5
    rloo_clipped_loss(logprob, torch.zeros(2), torch.tensor([1.0, -1.0]), clip=0.2).backward()
    assert logprob.grad.tolist() == [0.0, 0.0]


def test_the_reward_reads_the_last_real_token_and_the_loss_adds_the_grades():
    from openafm.posttrain.reward_model import GRADES, PairBatch, RewardModel, reward_model_loss
    from tests.conftest import make_tiny

    torch.manual_seed(0)
    model = RewardModel(make_tiny(), grade_hidden=16)
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0], [9, 8, 7, 6, 5]])
    with torch.no_grad():
        alone, grades_alone = model(short, torch.tensor([3]))
        both, grades = model(padded, torch.tensor([3, 5]))
    assert grades.shape == (2, len(GRADES), 3)
    assert torch.allclose(both[0], alone[0], atol=1e-5)  # padding after the end changes nothing
    assert torch.allclose(grades[0], grades_alone[0], atol=1e-5)
    batch = PairBatch(
        chosen=padded[:1],
        chosen_lengths=torch.tensor([3]),
        rejected=padded[1:],
        rejected_lengths=torch.tensor([5]),
        p=torch.tensor([0.75]),
        chosen_grades=torch.tensor([[2, -1, -1, 1]]),
        rejected_grades=torch.tensor([[0, -1, -1, -1]]),
    )
    with torch.no_grad():
        loss, stats = reward_model_loss(model, batch, grade_weight=0.5)
        expected = soft_ranking_loss(both[:1], both[1:], 0.75) + 0.5 * grading_loss(
            torch.cat([grades[:1], grades[1:]]), torch.tensor([[2, -1, -1, 1], [0, -1, -1, -1]])
        )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert stats["accuracy"] == float(both[0] > both[1])
    with pytest.raises(ValueError, match="between 1 and"):
        model(padded, torch.tensor([0, 5]))


def test_constraint_prompts_are_reproducible_compatible_and_scored_by_the_checkers():
    from lm_eval.tasks.ifeval import instructions_registry

    from openafm.eval import ifeval
    from openafm.posttrain.constraint_prompts import (
        constraint_reward,
        decontaminated,
        make_constraint_prompts,
    )

    bases = ["Write a short note to a neighbour about a lost cat.", "Describe your morning."]
    prompts = make_constraint_prompts(bases, 40, seed=3)
    assert prompts == make_constraint_prompts(bases, 40, seed=3)
    assert prompts != make_constraint_prompts(bases, 40, seed=4)
    conflicts = instructions_registry.INSTRUCTION_CONFLICTS
    sizes = {len(p.instruction_ids) for p in prompts}
    assert sizes == {1, 2, 3}
    for prompt in prompts:
        assert prompt.prompt.startswith(bases[(prompt.key - 1) % 2])
        for a in prompt.instruction_ids:
            assert not any(b in conflicts[a] for b in prompt.instruction_ids if b != a)
        assert 0.0 <= constraint_reward(prompt, "Hello. P.S. bye") <= 1.0
    lower = ifeval.IFEvalPrompt(1, "x", ("change_case:english_lowercase",), ({},))
    assert constraint_reward(lower, "all lower case here") == 1.0
    assert constraint_reward(lower, "Not Lower") == 0.0
    both = ifeval.IFEvalPrompt(
        2, "x", ("change_case:english_lowercase", "punctuation:no_comma"), ({}, {})
    )
    assert constraint_reward(both, "lower, but a comma") == 0.5
    ifeval_prompts = [p.prompt for p in ifeval.read_prompts(PROMPTS)]
    copied = ifeval_prompts[0][:200]
    kept = decontaminated([copied, bases[0]], ifeval_prompts)
    assert kept == [bases[0]]


def test_a_repeat_request_is_added_in_ifevals_own_words_and_layout():
    from openafm.eval import ifeval
    from openafm.posttrain.constraint_prompts import with_repeat_request

    ifevals = {p.key: p for p in ifeval.read_prompts(PROMPTS)}
    own = ifevals[1012]  # IFEval's: the request, then the repeat instruction on its own line
    request = own.kwargs[own.instruction_ids.index("combination:repeat_prompt")]
    plain = ifeval.IFEvalPrompt(
        1012, request["prompt_to_repeat"], ("detectable_format:title",), ({},)
    )
    ours = with_repeat_request(plain)
    assert ours.prompt == own.prompt
    assert sorted(zip(ours.instruction_ids, map(str, ours.kwargs), strict=True)) == sorted(
        zip(own.instruction_ids, map(str, own.kwargs), strict=True)
    )
    answer = "<<Goodbye>> I am leaving the company at the end of the month."
    assert ifeval.score(ours, f"{plain.prompt}\n\n{answer}").strict == (True, True)
    assert ifeval.score(ours, answer).strict == (True, False)


ANSWER = "The cat is grey, small and shy. She answers to Miso and likes tuna a lot."


@pytest.mark.parametrize(
    ("constraint", "kwargs", "passes"),
    [
        ("change_case:english_lowercase", {}, str.islower),
        ("change_case:english_capital", {}, str.isupper),
        ("startend:quotation", {}, lambda t: t[0] == t[-1] == '"'),
        ("startend:end_checker", {"end_phrase": "Any other questions?"}, None),
        ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, None),
        ("punctuation:no_comma", {}, lambda t: "," not in t),
    ],
)
def test_a_verified_repair_meets_the_constraint_and_keeps_the_words(constraint, kwargs, passes):
    from openafm.eval import ifeval
    from openafm.posttrain.repair import repaired

    prompt = ifeval.IFEvalPrompt(1, "x", (constraint,), (kwargs,))
    assert not all(ifeval.score(prompt, ANSWER).strict)
    fixed = repaired(prompt, ANSWER)
    assert fixed is not None and all(ifeval.score(prompt, fixed).strict)
    assert passes is None or passes(fixed)
    words = [w.strip('",.').lower() for w in ANSWER.split()]
    assert [w.strip('",.').lower() for w in fixed.split()][: len(words)] == words


def test_a_repaired_answer_repeats_the_request_first_then_meets_the_rest():
    from openafm.eval import ifeval
    from openafm.posttrain.constraint_prompts import with_repeat_request
    from openafm.posttrain.repair import repaired

    request = (
        "Describe your cat. Your entire response should be in English, and in all capital letters."
    )
    plain = ifeval.IFEvalPrompt(1, request, ("change_case:english_capital",), ({},))
    prompt = with_repeat_request(plain)
    fixed = repaired(prompt, ANSWER)
    assert fixed == f"{request}\n\n{ANSWER}".upper()
    assert all(ifeval.score(prompt, fixed).strict)
    commas = with_repeat_request(
        ifeval.IFEvalPrompt(2, "Be brief, kind.", ("punctuation:no_comma",), ({},))
    )
    assert repaired(commas, ANSWER) is None  # removing the commas would change the request


def test_a_repair_that_cannot_meet_every_constraint_is_not_kept():
    from openafm.eval import ifeval
    from openafm.posttrain.committee import Candidate
    from openafm.posttrain.repair import repair_groups, repaired

    ids = ("change_case:english_lowercase", "length_constraints:number_words")
    too_short = ifeval.IFEvalPrompt(1, "x", ids, ({}, {"relation": "at least", "num_words": 50}))
    assert repaired(too_short, ANSWER) is None  # lower case, but still too short
    lower = ifeval.IFEvalPrompt(2, "x", ids[:1], ({},))
    assert repaired(lower, ANSWER.lower()) is None  # nothing to repair
    ending = {"end_phrase": "Any other questions?"}
    ends = ifeval.IFEvalPrompt(3, "x", (ids[0], "startend:end_checker"), ({}, ending))
    said = f"{ANSWER} Any other questions?"
    assert repaired(ends, said) == said.lower()  # the phrase it has is not added again
    group = [
        Candidate(0, "base", 0, ANSWER, 20, True),
        Candidate(0, "base", 1, ANSWER, 64, False),  # cut at the cap: left as it is
        Candidate(0, "base", 2, "already fine", 2, True),
    ]
    (fixed,), count = repair_groups([lower], [group])
    assert count == 1 and fixed[0].text == ANSWER.lower() and fixed[1:] == group[1:]


def _trainer(
    algo: str,
    *,
    k: int = 8,
    updates: int = 2,
    lr: float = 1e-2,
    max_tokens: int = 4,
    trained_start: bool = False,
):
    from openafm.adapters import LoraAdapter, LoraConfig
    from openafm.posttrain.rl import PolicyTrainer, RLConfig
    from tests.conftest import byte_tokenizer, make_tiny

    model = make_tiny(seed=1)
    tokenizer = byte_tokenizer()
    adapter = LoraAdapter.fresh("policy", model, LoraConfig(rank=4), seed=0)
    if trained_start:  # B no longer zero, loaded as `afm posttrain rl --init-from` loads it
        with torch.no_grad():
            for _, b in adapter.pairs.values():
                b.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
        adapter = adapter.to(torch.float32)
        for p in adapter.parameters():
            p.requires_grad_(True)

    def first_half(_: int, completion) -> float:
        """The share of response tokens in the lower half of the vocabulary (about 1/2)."""
        tokens = completion.token_ids
        return sum(t < 256 for t in tokens) / max(1, len(tokens))

    config = RLConfig(algo=algo, k=k, updates=updates, lr=lr, max_tokens=max_tokens, beta=0.0)
    trainer = PolicyTrainer(model, tokenizer, adapter, first_half, config, seed=0)
    return trainer, [tokenizer.encode(t) for t in ("hi", "go", "ok", "yo")]


@pytest.mark.parametrize("algo", ["mdloo", "rloo"])
def test_an_update_moves_probability_toward_the_better_responses(algo):
    trainer, prompts = _trainer(algo)
    rollout = trainer.rollout(prompts)
    advantages = trainer.advantages(rollout)
    assert rollout.mask.sum() == sum(rollout.lengths) and advantages.abs().sum() > 0
    stats = trainer.update(rollout)
    with torch.no_grad():
        logprob = sequence_logprob(trainer.model(rollout.inputs), rollout.targets, rollout.mask)
    assert float((advantages * (logprob - rollout.old_logprob)).sum()) > 0
    assert stats["kl_to_reference"] == 0.0  # the first batch comes from the reference itself
    second = trainer.rollout(prompts)
    assert float((second.old_logprob - second.reference_logprob).abs().sum()) > 0


def test_the_reference_stays_where_training_began_from_a_trained_adapter():
    trainer, prompts = _trainer("mdloo", trained_start=True)
    start = [t.clone() for t in trainer.reference.parameters()]
    trainer.update(trainer.rollout(prompts))
    assert all(
        torch.equal(a, b) for a, b in zip(start, trainer.reference.parameters(), strict=True)
    )
    assert not all(
        torch.equal(a, b) for a, b in zip(start, trainer.adapter.parameters(), strict=True)
    )
    second = trainer.rollout(prompts)
    assert float((second.old_logprob - second.reference_logprob).abs().sum()) > 0


def test_with_one_update_mdloo_and_rloo_take_the_same_step():
    steps = []
    for algo in ("mdloo", "rloo"):
        trainer, prompts = _trainer(algo, updates=1)
        trainer.update(trainer.rollout(prompts))
        steps.append(torch.cat([t.detach().flatten() for t in trainer.adapter.parameters()]))
    assert torch.allclose(steps[0], steps[1], atol=1e-6)


@pytest.mark.parametrize("algo", ["mdloo", "rloo"])
def test_a_tiny_rl_run_raises_the_probability_of_the_rewarded_tokens(algo):
    trainer, _ = _trainer(algo, k=16, max_tokens=1)
    prompt = trainer.engine.tokenizer.encode("hi")

    def rewarded_mass() -> float:
        with torch.no_grad():
            return float(trainer.model(torch.tensor([prompt]))[0, -1].softmax(-1)[:256].sum())

    before = rewarded_mass()
    history = [trainer.step([prompt] * 8) for _ in range(30)]
    assert rewarded_mass() > before + 0.01
    assert all(h["empty_rate"] == 0 and h["length"] == 1 for h in history)


def test_an_update_whose_ratio_overflows_is_skipped_and_leaves_the_policy_finite():
    import dataclasses

    trainer, prompts = _trainer("rloo")
    rollout = trainer.rollout(prompts)
    before = [t.detach().clone() for t in trainer.adapter.parameters()]
    overflowing = dataclasses.replace(
        rollout, old_logprob=torch.full_like(rollout.old_logprob, -1e6)
    )
    stats = trainer.update(overflowing)
    assert stats["skipped_updates"] == 2
    for a, b in zip(trainer.adapter.parameters(), before, strict=True):
        assert torch.equal(a, b)
    assert trainer.update(rollout)["skipped_updates"] == 0


def test_rl_settings_are_checked_before_any_work():
    from openafm.posttrain.rl import RLConfig

    with pytest.raises(ValueError, match="k >= 2"):
        RLConfig(k=1)
    with pytest.raises(ValueError, match="algo must be"):
        RLConfig(algo="ppo")
