"""The TRL adapter against TRL itself (pip ``trl``, CPU): a tiny random Qwen2 and a word-level
tokenizer built in code, two GRPO training steps of StepPOGRPOTrainer, whose loss must equal
TRL's own on every batch it sees."""

import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

from steppo_fast.integrations.trl import StepPOGRPOTrainer  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]


def _tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg)


def _reward(completions, **kwargs):
    """The sum of the word numbers of a completion, scaled: varies between samples."""
    return [0.1 * sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) for c in completions]


def _args(**overrides):
    kw = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
              max_completion_length=6, max_steps=2, importance_sampling_level="sequence", loss_type="grpo",
              report_to=[], use_cpu=True, logging_steps=1, beta=0.0, num_iterations=2, save_strategy="no",
              learning_rate=1e-3, seed=0)
    kw.update(overrides)
    return trl.GRPOConfig(**kw)


class _Checking(StepPOGRPOTrainer):
    """Computes TRL's loss on the same batch next to ours and records both (and the lm_head
    gradients of both)."""

    seen = []

    def _compute_loss(self, model, inputs):
        ours = super()._compute_loss(model, inputs)
        theirs = trl.GRPOTrainer._compute_loss(self, model, inputs)
        w = model.lm_head.weight
        g_ours, = torch.autograd.grad(ours, [w], retain_graph=True)
        g_theirs, = torch.autograd.grad(theirs, [w], retain_graph=True)
        self.seen.append((ours.detach(), theirs.detach(), g_ours, g_theirs))
        return ours


@pytest.mark.parametrize("level,loss_type", [("sequence", "grpo"), ("token", "bnpo"), ("sequence", "dr_grpo"),
                                             ("token", "dapo")])
def test_two_training_steps_match_trls_loss(level, loss_type):
    ds = datasets.Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i + 2}" for i in range(8)]})
    model = _model()
    before = model.lm_head.weight.detach().clone()
    _Checking.seen = []
    trainer = _Checking(model=model, reward_funcs=_reward, train_dataset=ds, processing_class=_tokenizer(),
                        args=_args(importance_sampling_level=level, loss_type=loss_type))
    trainer.train()
    assert len(_Checking.seen) >= 2
    assert any(abs(float(o)) > 1e-4 for o, *_ in _Checking.seen), "every loss was 0: the test shows nothing"
    assert any(float(g.abs().max()) > 1e-4 for _, _, g, _ in _Checking.seen), "every gradient was 0"
    for ours, theirs, g_ours, g_theirs in _Checking.seen:
        assert torch.isfinite(ours)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        # dL/dlogp agree to fp32 rounding; the lm_head gradient sums terms of both signs (a group's
        # advantages sum to 0), which magnifies that rounding: compare at 1e-4 of its largest entry.
        torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-4 * float(g_theirs.abs().max()) + 1e-9)
    assert not torch.equal(model.lm_head.weight.detach(), before), "training did not change the parameters"


def test_unsupported_options_are_refused():
    ds = datasets.Dataset.from_dict({"prompt": ["w1 w2 w3"] * 4})
    with pytest.raises(ValueError, match="loss_type='cispo'"):
        StepPOGRPOTrainer(model=_model(), reward_funcs=_reward, train_dataset=ds, processing_class=_tokenizer(),
                          args=_args(loss_type="cispo"))


class _CheckingSteps(_Checking):
    """Adds step_ids to every batch: each completion one step (its masked-in tokens are step 0),
    which must give TRL's sequence-level loss again, now through the per-step layout path."""

    def _compute_loss(self, model, inputs):
        mask = inputs["completion_mask"].bool()
        inputs = dict(inputs, step_ids=torch.where(mask, 0, -1))
        return super()._compute_loss(model, inputs)


def test_step_ids_path_matches_trls_sequence_level_loss():
    ds = datasets.Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i + 2}" for i in range(8)]})
    _Checking.seen = []
    trainer = _CheckingSteps(model=_model(), reward_funcs=_reward, train_dataset=ds, processing_class=_tokenizer(),
                             args=_args(importance_sampling_level="sequence", loss_type="grpo"))
    trainer.train()
    assert len(_Checking.seen) >= 2 and any(abs(float(o)) > 1e-4 for o, *_ in _Checking.seen)
    for ours, theirs, _, _ in _Checking.seen:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
