"""How big a training run is, before it runs: parameters (each model built on the meta device, so
no weight is allocated), memory for the training state, activation memory per sample, the largest
batch per process for common GPU memory sizes, and model FLOPs per target token (for MFU).

Activations are an analytic estimate from shapes, never a measurement. Under bf16 autocast
(2 bytes an element) one transformer layer over s positions of width h, FFN width f and a heads
keeps for the backward pass about
    s * (16 h + 4 f) bytes                  (layer-norm inputs/outputs, q, k, v, attention output,
                                             residuals: 8 tensors of s x h; FFN in/out: 2 of s x f)
  + s * 8 h bytes                           (a decoder block's cross-attention: its input, q, output)
  + 4 a s^2 bytes                           (scores and probabilities, only where attention is
                                             materialised: Hugging Face's eager OPT, the baseline;
                                             our own blocks use fused scaled_dot_product_attention)
and the vocabulary projection 10 bytes per logit (bf16 logits, their fp32 upcast in the loss and
its fp32 gradient). A "sample" is what train.batch_size counts: a sentence in stage 1 (the longest
the model takes), a passage in stage 2 and the baseline (data.max_passage_tokens tokens in
data.max_passage_sentences sentences). Stage 2 is sized from its `svae` section: at training time a
sllm.svae_checkpoint's own config replaces it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

GPU_MEMORY_GB = (24, 40, 80)
USABLE_SHARE = 0.9  # of a card's memory: the CUDA context, the allocator's fragmentation and workspaces take the rest
ACT_BYTES = 2  # bf16 autocast
LOGIT_BYTES = 10

# Training state per parameter, as sllm.training.trainer keeps it: fp32 weights (the master weights:
# autocast makes bf16 copies on the fly, kept for the backward pass), fp32 gradients, AdamW's two
# fp32 moments, the fp32 EMA, and DDP's gradient buckets when there is more than one process.
STATE_BYTES = {"weights": 4, "bf16_copies": 2, "grads": 4, "adamw": 8, "ema": 4, "ddp_buckets": 4}

# Dense (no sparsity) peak bf16 tensor FLOP/s from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order (the first name contained wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 154.8),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """FLOP/s of one device by name; None for one not in the table (MFU is then not reported)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


@dataclass
class Stack:
    """A stack of transformer layers run over `positions` positions a sample."""
    name: str
    linear_params: int  # weights of its Linear layers (what the matmul FLOPs scale with)
    layers: int
    width: int
    ffn: int
    heads: int
    positions: float  # per sample
    context: float  # keys each position attends to
    cross_attention: bool = False
    eager_attention: bool = False


@dataclass
class Sizing:
    kind: str
    params: int
    trainable: int
    stacks: list[Stack]
    logits: float  # vocabulary projections a sample
    vocab: int
    width_out: int  # width of the vocabulary projection's input
    target_tokens: float  # a sample

    def state_bytes(self, processes: int = 1) -> int:
        s = STATE_BYTES
        per_trainable = s["bf16_copies"] + s["grads"] + s["adamw"] + (s["ddp_buckets"] if processes > 1 else 0)
        return self.params * (s["weights"] + s["ema"]) + self.trainable * per_trainable

    def optimizer_bytes(self) -> int:
        return self.trainable * STATE_BYTES["adamw"]

    def activation_bytes(self) -> float:
        """Per sample (see the module docstring for the formula)."""
        total = 0.0
        for st in self.stacks:
            h = st.width
            per_layer = st.positions * (16 * h + 4 * st.ffn) * ACT_BYTES / 2
            if st.cross_attention:
                per_layer += st.positions * 8 * h * ACT_BYTES / 2
            if st.eager_attention:
                per_layer += 4 * st.heads * st.positions * st.context * ACT_BYTES / 2
            total += st.layers * per_layer
        return total + self.logits * self.vocab * LOGIT_BYTES

    def max_batch(self, memory_gb: float, processes: int = 1) -> int:
        free = memory_gb * 1e9 * USABLE_SHARE - self.state_bytes(processes)
        return max(0, int(free // self.activation_bytes()))

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward = 3 x forward) per target token: 6 N per position for
        the matmul weights, 12 x layers x width x context for attention (PaLM's count), 6 h V a logit."""
        per_sample = 0.0
        for st in self.stacks:
            per_sample += st.positions * (6 * st.linear_params + 12 * st.layers * st.width * st.context)
        per_sample += 6 * self.width_out * self.vocab * self.logits
        return per_sample / self.target_tokens


def _linear_params(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    skipped = {id(m.weight) for m in skip}
    return sum(m.weight.numel() for m in module.modules()
               if isinstance(m, nn.Linear) and id(m.weight) not in skipped)


def _count(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _opt_config(spec, vocab_size: int):
    """The OPTConfig a run would build: a local pretrained folder's config.json, or the spec's sizes."""
    from transformers import OPTConfig

    from sllm.modeling.opt_graft import opt_config_from_spec

    if spec.pretrained:
        cfg = OPTConfig.from_dict(json.loads((Path(spec.pretrained) / "config.json").read_text()))
    else:
        cfg = opt_config_from_spec(spec, vocab_size)
    cfg._attn_implementation = "eager"  # as load_opt builds it
    return cfg


def _svae_stacks(svae, sentences: float, tokens: float, decodes: int) -> list[Stack]:
    c = svae.cfg
    per_sentence = tokens / sentences
    enc = Stack("encoder", _linear_params(svae.encoder), c.encoder_layers, c.d_model, c.ffn_dim, c.n_heads,
                tokens, per_sentence)
    dec = Stack("decoder", _linear_params(svae.decoder, (svae.decoder.lm_head,)), c.decoder_layers, c.d_model,
                c.ffn_dim, c.n_heads, decodes * (tokens + sentences), per_sentence + 1, cross_attention=True)
    return [enc, dec]


def _with_vocab(cfg, data, as_configured: bool):
    """The SentenceVAE config with the vocabulary training will give it: a BPE trained here has
    data.vocab_size rows; a given tokenizer decides at training time (the config's size is used)."""
    import dataclasses

    if as_configured or data.tokenizer or data.dataset:
        return cfg
    return dataclasses.replace(cfg, vocab_size=data.vocab_size)


def size_run(run, as_configured: bool = False, baseline_vocab: int = 0) -> Sizing:
    """The sizing of any run config (RunConfig, SLLMRunConfig, BaselineRunConfig), built on meta.
    as_configured: the vocabulary is the model config's as it stands (a task has set it from its
    tokenizer), not the one a BPE of data.vocab_size would give. baseline_vocab: the baseline's
    vocabulary when known (its built model's); 0: data.vocab_size."""
    from transformers import OPTForCausalLM

    from sllm.modeling.opt_graft import GraftedOPT
    from sllm.modeling.sentence_vae import SentenceVAE
    from sllm.modeling.sllm import SLLM

    with torch.device("meta"):
        if run.kind == "sentence_vae":
            c = _with_vocab(run.model, run.data, as_configured)
            model = SentenceVAE(c)
            L = c.max_sentence_tokens
            stacks = _svae_stacks(model, 1, L, 1)
            return Sizing(run.kind, *_count(model), stacks, L + 1, c.vocab_size, c.d_model, L + 1)
        if run.kind == "sllm":
            c = run.svae if run.sllm.svae_checkpoint else _with_vocab(run.svae, run.data, as_configured)
            svae = SentenceVAE(c)
            graft = GraftedOPT(_opt_config(run.opt, c.vocab_size))
            model = SLLM(svae, graft)
            o = run.sllm
            model.set_trainable(o.freeze_svae, o.finetune_layers, o.finetune_from)
            T, N = run.data.max_passage_sentences, run.data.max_passage_tokens
            decodes = 1 + (o.reconstruction_loss_weight > 0)
            oc = graft.config
            stacks = _svae_stacks(svae, T, N, decodes) + [
                Stack("opt", _linear_params(graft), oc.num_hidden_layers, oc.hidden_size, oc.ffn_dim,
                      oc.num_attention_heads, T, T)]
            return Sizing(run.kind, *_count(model), stacks, decodes * (N + T), c.vocab_size, c.d_model, N + T)
        if run.kind == "opt_baseline":
            oc = _opt_config(run.opt, baseline_vocab or run.data.vocab_size)
            model = OPTForCausalLM(oc)
            s = run.data.max_passage_tokens + 1
            stacks = [Stack("opt", _linear_params(model.model.decoder), oc.num_hidden_layers, oc.hidden_size,
                            oc.ffn_dim, oc.num_attention_heads, s, s, eager_attention=True)]
            return Sizing(run.kind, *_count(model), stacks, s, oc.vocab_size, oc.word_embed_proj_dim, s)
    raise ValueError(f"no sizing for run kind {run.kind!r}")


def flops_per_token(run, model: nn.Module | None = None) -> float:
    """Of a run whose task is built (its model configs hold the tokenizer's vocabulary; a Hugging
    Face model, the baseline, carries its own in .config)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0) if run.kind == "opt_baseline" else 0
    return size_run(run, as_configured=True, baseline_vocab=vocab).flops_per_token()


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def render(name: str, s: Sizing, processes: int = 1) -> str:
    """A short human report (what `--dry-run` prints)."""
    lines = [
        f"{name} ({s.kind})",
        f"  parameters          {s.params / 1e6:,.1f} M ({s.trainable / 1e6:,.1f} M trainable)",
        f"  optimizer (AdamW)   {_gb(s.optimizer_bytes())}  (two fp32 moments a trainable parameter)",
        f"  training state      {_gb(s.state_bytes(processes))}  (fp32 weights = master weights, bf16 copies, "
        f"grads, AdamW, EMA{', DDP buckets' if processes > 1 else ''})",
        f"  activations/sample  {_gb(s.activation_bytes())}  (bf16 autocast, analytic; "
        f"{s.target_tokens:.0f} target tokens a sample)",
        f"  FLOPs/target token  {s.flops_per_token() / 1e9:.2f} GFLOP (forward + backward)",
        "  largest batch/proc  " + ", ".join(f"{gb} GB: {s.max_batch(gb, processes)}" for gb in GPU_MEMORY_GB),
    ]
    return "\n".join(lines)


def table_row(name: str, s: Sizing, processes: int = 1) -> str:
    """One Markdown table row: name, params, trainable, optimizer, state, activations, batch per size."""
    cells = [name, f"{s.params / 1e6:,.1f} M", f"{s.trainable / 1e6:,.1f} M", _gb(s.optimizer_bytes()),
             _gb(s.state_bytes(processes)), _gb(s.activation_bytes()),
             f"{s.flops_per_token() / 1e9:.2f}", *(str(s.max_batch(gb, processes)) for gb in GPU_MEMORY_GB)]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = ("| config | params | trainable | AdamW states | training state | activations / sample | "
                "GFLOP / token | batch @24 GB | batch @40 GB | batch @80 GB |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
