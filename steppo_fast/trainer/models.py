"""Policy, critic and tokenizer for the trainer.

The policy is any HF causal LM: built from a config in code (a tiny Qwen2, the default) or
loaded from a local path. The trainer never asks it for logits: it runs the backbone and hands
the hidden states and the lm_head weight to the fused kernels. The critic is a linear value
head read at step boundaries (SPEC 1, "Values"), on the policy's backbone (``shared``) or on
a backbone of its own (``separate``).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_tokenizer(words: Sequence[str]):
    """A word-level HF tokenizer over ``words`` plus ``<pad>``, ``<eos>`` (end of step) and ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for w in words:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise ValueError(f"vocabulary words must be non-empty strings without spaces, got {w!r}")
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def load_tokenizer(path: str):
    """The tokenizer saved in ``path``, of the class it was saved as.

    A plain ``tokenizers`` tokenizer (as built in code here) is loaded as such: AutoTokenizer would
    pick the model type's tokenizer class from config.json and rebuild it without our pre-tokenizer.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = os.path.join(path, "tokenizer_config.json")
    saved_class = None
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            saved_class = json.load(f).get("tokenizer_class")
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def check_model_path(path: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"model path {path!r} does not exist or is not a directory "
                         "(give a local folder saved with save_pretrained, or no model for the tiny default)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(f"model path {path!r} has no config.json: not a saved HF model")


def attn_implementation(requested: str, device: torch.device) -> str:
    """``auto``: flash-attn 2 on a GPU when the package is installed, else PyTorch SDPA."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_policy(model: Optional[str], tokenizer, model_config: dict, attn: str, seed: int):
    """(policy, tokenizer): a tiny Qwen2 from ``model_config`` over ``tokenizer``, or a local model."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from .config import TINY_MODEL

    if model is not None:
        check_model_path(model)
        if tokenizer is None:
            tokenizer = load_tokenizer(model)
        policy = AutoModelForCausalLM.from_pretrained(model, attn_implementation=attn, dtype=torch.float32)
        return policy, tokenizer
    if tokenizer is None:
        raise ValueError("a model built in code needs a tokenizer: the environment has no vocabulary()")
    known = set(Qwen2Config().to_dict()) | set(inspect.signature(Qwen2Config.__init__).parameters)
    unknown = sorted(set(model_config) - known)
    if unknown:
        raise ValueError(f"model_config has setting(s) a Qwen2 config does not know: {', '.join(map(str, unknown))}")
    cfg = {**TINY_MODEL, **model_config}
    size, heads, kv = (cfg.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    positive = lambda *xs: all(isinstance(x, int) and x > 0 for x in xs)  # noqa: E731
    if "head_dim" not in cfg and positive(size, heads) and size % heads:
        raise ValueError(f"model_config: hidden_size {size} is not a multiple of num_attention_heads {heads}")
    if positive(heads, kv) and heads % kv:
        raise ValueError(f"model_config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    try:
        config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=tokenizer.eos_token_id, **cfg)
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = Qwen2ForCausalLM(config)
            if attn in ("sdpa", "eager"):  # a model that builds can still fail on its first forward
                with torch.no_grad():
                    ids = torch.full((1, 2), tokenizer.eos_token_id, dtype=torch.long)
                    policy(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"model_config {model_config} does not make a working Qwen2 "
                         f"({' '.join(str(e).split())[:300]})") from e
    return policy, tokenizer


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer under an HF causal LM (what returns hidden states, not logits)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(base, nn.Module):
        return base
    raise ValueError(f"cannot find the backbone of {type(model).__name__} (no base_model_prefix attribute)")


class ActorCritic(nn.Module):
    """The policy (an HF causal LM) and, optionally, a value head.

    ``forward(input_ids, attention_mask)`` returns ``(hidden, values)``: the policy backbone's last
    hidden states (B, L, H) and the value head's outputs (B, L) float32 (None without a critic);
    ``values[:, j]`` is the critic's value of the state after token j, i.e. before token j + 1.
    """

    def __init__(self, policy: nn.Module, critic: Optional[str], seed: int = 0):
        super().__init__()
        self.policy = policy
        self.critic_kind = critic
        self.critic_backbone = None
        self.value_head = None
        if critic is None:
            return
        from transformers import AutoModel

        hidden = policy.config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            if critic == "separate":
                self.critic_backbone = AutoModel.from_config(policy.config)
                self.critic_backbone.to(next(policy.parameters()).device)
            self.value_head = nn.Linear(hidden, 1)
            nn.init.normal_(self.value_head.weight, std=0.01)
            nn.init.zeros_(self.value_head.bias)

    @property
    def lm_head(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def backbone(self) -> nn.Module:
        return backbone_of(self.policy)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        hidden = self.backbone()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if self.value_head is None:
            return hidden, None
        if self.critic_backbone is not None:
            ch = self.critic_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state
        else:
            ch = hidden
        with torch.autocast(ch.device.type, enabled=False):  # values in fp32 under mixed precision
            values = self.value_head(ch.float()).squeeze(-1)
        return hidden, values

    def policy_parameters(self):
        return list(self.policy.parameters())

    def critic_parameters(self):
        out = []
        if self.critic_backbone is not None:
            out += list(self.critic_backbone.parameters())
        if self.value_head is not None:
            out += list(self.value_head.parameters())
        return out
