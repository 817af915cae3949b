"""The exported graphs written node by node with ONNX Runtime's fused operators, from the weights.

Per transformer block: one `com.microsoft.Attention` (Q/K/V in one weight, the KV cache as its
past/present, causality from `unidirectional`, padding from the raw mask: no mask arithmetic in the
graph), one output projection, `SkipLayerNormalization` (residual add + LayerNorm), the MLP as two
MatMuls and `BiasGelu` (or Add + Relu for OPT). Same input/output contract as the torch exports
(`sllm.runtime.svae_onnx`, `sllm.export.baseline_onnx`); the exporter checks them against torch.

    encoder_graph(enc)   ids [B, L], mask [B, L] -> vectors [B, d]
    decoder_graph(dec)   ids [B, T], memory [B, d], past_kv [n_layers, 2, B, H, P, hd] -> logits, present_kv
    sentence_graph(dec)  one sentence in one call: an ONNX Loop over the decoder step (batch 1) with the
                         edge's repetition controls and sampling inside (contract in runtime.svae_onnx)
    baseline_graph(opt)  the token-level OPT: ids [B, T], past_kv -> logits [B, 1, V], present_kv
    cloud_graph(grafted) the cloud step: vectors [B, T, d], positions, past_kv, mask -> hidden, stop logits,
                         present_kv (sllm.cloud.onnx_step runs it)

The SentenceDecoder's cross-attention reads a memory of length 1: its softmax is exactly 1, so its
output is proj(v(memory)) whatever the query, one Gemm per sentence (weights folded in float64).
Never imported by the edge (it needs torch modules to read weights from). It needs `onnx`, which the
export and cloud installs have and the train install lacks: nothing in training/ imports it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper

MS = "com.microsoft"
OPSET = 18
LN_EPS = 1e-5


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class Builder:
    """Nodes, initializers and fresh names for one graph (or a Loop/If body)."""

    def __init__(self, prefix: str = "", weights_to: "Builder | None" = None):
        self.nodes, self.inits, self.prefix, self.n = [], [], prefix, 0
        self.consts: dict = {}
        self.stored: dict = {}
        self.weights_to = weights_to  # a loop body keeps its weights in the outer graph (one copy per file)

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def weight(self, hint: str, arr: np.ndarray) -> str:
        if self.weights_to is not None:
            return self.weights_to.weight(hint, arr)
        arr = np.array(arr, order="C")  # 0-d stays 0-d
        key = (arr.dtype.str, arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())
        if key not in self.stored:  # equal tensors are stored once (the loop bodies' steps share them)
            self.stored[key] = self.name(hint)
            self.inits.append(numpy_helper.from_array(arr, self.stored[key]))
        return self.stored[key]

    def const(self, value, dtype=np.int64) -> str:
        """A small constant initializer (shared by value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.consts:
            self.consts[key] = self.weight("c", arr)
        return self.consts[key]

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, outputs: list[str] | None = None,
           domain: str = "", **attrs):
        outs = outputs or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(oh.make_node(op_type, inputs, outs, name=self.name("n_" + op_type),
                                       domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs


def _model(b: Builder, inputs, outputs, name: str) -> onnx.ModelProto:
    graph = oh.make_graph(b.nodes, name, inputs, outputs, b.inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", OPSET), oh.make_opsetid(MS, 1)],
                          producer_name="sllm.modeling.fused_onnx")
    model.ir_version = 9
    return model


def _vi(name: str, dtype, shape) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, dtype, shape)


# ---------------------------------------------------------------- blocks

def _attention(b: Builder, h: str, qkv_w: np.ndarray, qkv_b: np.ndarray, heads: int, past: str = "",
               mask: str = "", causal: bool = False) -> tuple[str, str | None]:
    """h [B, T, d] -> (attention output before its projection [B, T, d], present [2, B, H, P+T, hd] or None).
    qkv_w [3d, d] (torch Linear layout, rows q|k|v), qkv_b [3d]."""
    inputs = [h, b.weight("qkv_w", qkv_w.T), b.weight("qkv_b", qkv_b), mask]
    if past:
        inputs.append(past)
        y, present = b.op("Attention", inputs, 2, domain=MS, num_heads=heads, unidirectional=int(causal))
        return y, present
    while inputs[-1] == "":
        inputs.pop()
    return b.op("Attention", inputs, domain=MS, num_heads=heads, unidirectional=int(causal)), None


def _skip_ln(b: Builder, x: str, skip: str, ln, bias: str = "") -> tuple[str, str]:
    """LayerNorm(x + skip (+ bias)) and the sum: the residual add fused with the next LayerNorm."""
    ins = [x, skip, b.weight("ln_g", _np(ln.weight)), b.weight("ln_b", _np(ln.bias))]
    if bias:
        ins.append(bias)
    out, _, _, total = b.op("SkipLayerNormalization", ins, 4, domain=MS, epsilon=float(ln.eps))
    return out, total


def _linear_nobias(b: Builder, x: str, lin) -> str:
    return b.op("MatMul", [x, b.weight("w", _np(lin.weight).T)])


def _mlp_gelu(b: Builder, h: str, mlp) -> str:
    """GELU MLP without its last bias (the next SkipLayerNormalization adds it)."""
    f = b.op("MatMul", [h, b.weight("fc_w", _np(mlp.fc.weight).T)])
    a = b.op("BiasGelu", [f, b.weight("fc_b", _np(mlp.fc.bias))], domain=MS)
    return b.op("MatMul", [a, b.weight("proj_w", _np(mlp.proj.weight).T)])


# ---------------------------------------------------------------- SentenceVAE encoder

def encoder_graph(enc) -> onnx.ModelProto:
    cfg = enc.cfg
    d, V = cfg.d_model, cfg.vocab_size
    b = Builder("e_")
    ids = b.op("Where", ["mask", "ids", b.const(cfg.pad_id)])  # whatever sits in padding stays in range
    tok = b.op("Gather", [b.weight("tok_emb", _np(enc.tok_emb.weight)), ids])  # [B, L, d]
    L = b.op("Shape", ["ids"], start=1, end=2)
    pos = b.op("Slice", [b.weight("pos_emb", _np(enc.pos_emb.weight)), b.const([0]), L, b.const([0])])  # [L, d]
    mask_i = b.op("Cast", ["mask"], to=TP.INT32)  # raw key padding mask: Attention masks the keys itself
    blocks = list(enc.blocks)
    h, x = _skip_ln(b, tok, pos, blocks[0].ln1)
    for i, blk in enumerate(blocks):
        y, _ = _attention(b, h, _np(blk.attn.qkv.weight), _np(blk.attn.qkv.bias), cfg.n_heads, mask=mask_i)
        a = _linear_nobias(b, y, blk.attn.proj)
        h, x = _skip_ln(b, a, x, blk.ln2, b.weight("proj_b", _np(blk.attn.proj.bias)))
        m = _mlp_gelu(b, h, blk.mlp)
        m_bias = b.weight("mlp_b", _np(blk.mlp.proj.bias))
        if i + 1 < len(blocks):
            h, x = _skip_ln(b, m, x, blocks[i + 1].ln1, m_bias)
        else:
            x = b.op("Add", [b.op("Add", [m, m_bias]), x])  # [B, L, d]
    maskf = b.op("Cast", ["mask"], to=TP.FLOAT)  # [B, L]
    if enc.score is None:  # "sum" over real tokens: [B, 1, L] @ [B, L, d]
        w = b.op("Unsqueeze", [maskf, b.const([1])])
    else:  # "weighted": masked softmax of a learned per-token score
        s = b.op("Add", [b.op("MatMul", [x, b.weight("score_w", _np(enc.score.weight).T)]),
                         b.weight("score_b", _np(enc.score.bias))])  # [B, L, 1]
        s = b.op("Squeeze", [s, b.const([-1])])
        s = b.op("Where", ["mask", s, b.const(np.finfo(np.float32).min, np.float32)])
        w = b.op("Unsqueeze", [b.op("Mul", [b.op("Softmax", [s], axis=-1), maskf]), b.const([1])])
    fused = b.op("MatMul", [w, x])  # [B, 1, d]
    out = b.op("LayerNormalization", [fused, b.weight("ln_g", _np(enc.ln.weight)), b.weight("ln_b", _np(enc.ln.bias))],
               axis=-1, epsilon=float(enc.ln.eps))
    b.op("Squeeze", [out, b.const([1])], outputs=["vectors"])
    return _model(b, [_vi("ids", TP.INT64, ["batch", "length"]), _vi("mask", TP.BOOL, ["batch", "length"])],
                  [_vi("vectors", TP.FLOAT, ["batch", d])], "sentence_encoder")


# ---------------------------------------------------------------- SentenceVAE decoder

def _cross_constant(b: Builder, dec, memory: str) -> list[str]:
    """Per block: proj(v(memory)) as [B, 1, d] (cross-attention over a memory of length 1)."""
    d = dec.cfg.d_model
    out = []
    for blk in dec.blocks:
        wv, bv = blk.cross.kv.weight[d:].detach().double(), blk.cross.kv.bias[d:].detach().double()
        wp, bp = blk.cross.proj.weight.detach().double(), blk.cross.proj.bias.detach().double()
        w = (wp @ wv).T.float().numpy()  # [d, d]: memory @ w = proj(v(memory)) - its biases
        bias = (wp @ bv + bp).float().numpy()
        c = b.op("Gemm", [memory, b.weight("cross_w", w), b.weight("cross_b", bias)])  # [B, d]
        out.append(b.op("Unsqueeze", [c, b.const([1])]))
    return out


def _decoder_step(b: Builder, dec, ids: str, past_kv: str, cross: list[str], weights: tuple[str, str],
                  logits: str, present_kv: str) -> None:
    """The decoder step's nodes: ids [B, T] at positions P.., past_kv -> logits [B, T, V], present_kv."""
    cfg = dec.cfg
    P = b.op("Shape", [past_kv], start=4, end=5)
    T = b.op("Shape", [ids], start=1, end=2)
    pos = b.op("Slice", [b.weight("pos_emb", _np(dec.pos_emb.weight)), P, b.op("Add", [P, T]), b.const([0])])
    tok_w, lm_w = weights
    tok = b.op("Gather", [tok_w, ids])  # [B, T, d]
    blocks = list(dec.blocks)
    h, x = _skip_ln(b, tok, pos, blocks[0].ln1)
    presents = []
    for i, blk in enumerate(blocks):
        past = b.op("Gather", [past_kv, b.const(i)], axis=0)  # [2, B, H, P, hd]
        y, present = _attention(b, h, _np(blk.attn.qkv.weight), _np(blk.attn.qkv.bias), cfg.n_heads, past=past,
                                causal=True)
        presents.append(present)
        a = _linear_nobias(b, y, blk.attn.proj)
        # x + attn + cross: the cross-attention output does not depend on the query (see the docstring)
        h, x = _skip_ln(b, a, b.op("Add", [x, cross[i]]), blk.ln3, b.weight("proj_b", _np(blk.attn.proj.bias)))
        m = _mlp_gelu(b, h, blk.mlp)
        nxt = blocks[i + 1].ln1 if i + 1 < len(blocks) else dec.ln_f
        h, x = _skip_ln(b, m, x, nxt, b.weight("mlp_b", _np(blk.mlp.proj.bias)))
    b.op("MatMul", [h, b.op("Transpose", [lm_w], perm=[1, 0])], outputs=[logits])
    if len(presents) == 1:
        b.op("Unsqueeze", [presents[0], b.const([0])], outputs=[present_kv])
    else:
        b.op("Concat", [b.op("Unsqueeze", [p, b.const([0])]) for p in presents], outputs=[present_kv], axis=0)


def _embeddings(b: Builder, dec) -> tuple[str, str]:
    """(token embedding, output layer weight), both [V, d]: one initializer when tied."""
    tok = b.weight("tok_emb", _np(dec.tok_emb.weight))
    if dec.lm_head.weight is dec.tok_emb.weight:
        return tok, tok
    return tok, b.weight("lm_head", _np(dec.lm_head.weight))


def decoder_graph(dec) -> onnx.ModelProto:
    cfg = dec.cfg
    d, V, L, H, hd = cfg.d_model, cfg.vocab_size, dec.n_layers, dec.n_heads, dec.head_dim
    b = Builder("d_")
    cross = _cross_constant(b, dec, "memory")
    _decoder_step(b, dec, "ids", "past_kv", cross, _embeddings(b, dec), "logits", "present_kv")
    return _model(b, [_vi("ids", TP.INT64, ["batch", "step"]), _vi("memory", TP.FLOAT, ["batch", d]),
                      _vi("past_kv", TP.FLOAT, [L, 2, "batch", H, "past", hd])],
                  [_vi("logits", TP.FLOAT, ["batch", "step", V]),
                   _vi("present_kv", TP.FLOAT, [L, 2, "batch", H, "total", hd])], "sentence_decoder")


# ---------------------------------------------------------------- one sentence in one call

def _controls(eos_id: int, V: int) -> onnx.GraphProto:
    """Nodes (as a graph to inline into a loop body) from logits `lg` [1, V] to `lg_c`, the repetition
    controls applied by the rules of sllm.sentences.sampling.RepetitionGuard: the penalty on every token of `seq` (the
    answer so far), then -inf on the tokens that would repeat an n-gram of `seq` and on eos where the
    sentence so far (`cur`, -1 padded) equals a row of `earlier` (-1 padded; a -2 row never matches)."""
    b = Builder("c_")
    idx = b.op("Unsqueeze", ["seq", b.const([0])])  # [1, N]
    v = b.op("GatherElements", ["lg", idx], axis=1)
    pv = b.op("Where", [b.op("Greater", [v, b.const(0.0, np.float32)]), b.op("Div", [v, "penalty"]),
                        b.op("Mul", [v, "penalty"])])
    lg = b.op("ScatterElements", ["lg", idx, pv], axis=1)  # duplicates write equal values
    # no-repeat n-gram: windows seq[i:i+n-1] equal to the last n-1 tokens ban seq[i+n-1]
    n = "ngram"
    N = b.op("Size", ["seq"])
    m = b.op("Max", [b.op("Sub", [n, b.const(1)]), b.const(0)])
    count = b.op("Where", [b.op("Greater", [n, b.const(0)]),
                           b.op("Max", [b.op("Sub", [N, m]), b.const(0)]), b.const(0)])  # N - n + 1 windows
    i = b.op("Range", [b.const(0), count, b.const(1)])  # [C]
    j = b.op("Range", [b.const(0), m, b.const(1)])  # [m]
    win = b.op("Gather", ["seq", b.op("Add", [b.op("Unsqueeze", [i, b.const([1])]), j])])  # [C, m]
    # the last m tokens, read from seq with m fillers in front (it may hold fewer than m tokens)
    padded = b.op("Concat", [b.op("Expand", [b.const(-3), b.op("Unsqueeze", [m, b.const([0])])]), "seq"], axis=0)
    suffix = b.op("Gather", [padded, b.op("Add", [j, N])])  # [m]
    diff = b.op("ReduceSum", [b.op("Abs", [b.op("Sub", [win, suffix])]), b.const([1])], keepdims=0)  # [C]
    banned = b.op("Compress", [b.op("Gather", ["seq", b.op("Add", [i, m])]), b.op("Equal", [diff, b.const(0)])],
                  axis=0)  # [K]
    bidx = b.op("Unsqueeze", [banned, b.const([0])])  # [1, K]
    neg = b.op("Expand", [b.const([[-np.inf]], np.float32), b.op("Shape", [bidx])])
    lg = b.op("ScatterElements", [lg, bidx, neg], axis=1)
    # no repeated sentence: eos is banned where cur equals an earlier sentence
    same = b.op("ReduceMin", [b.op("Cast", [b.op("Equal", ["earlier", b.op("Unsqueeze", ["cur", b.const([0])])])],
                                   to=TP.INT64), b.const([1])], keepdims=0)  # [S]
    repeat = b.op("Cast", [b.op("ReduceMax", [same], keepdims=0)], to=TP.BOOL)
    eos_hot = b.const(np.arange(V)[None, :] == eos_id, np.bool_)
    b.op("Where", [b.op("And", [eos_hot, repeat]), b.const(-np.inf, np.float32), lg], outputs=["lg_c"])
    return oh.make_graph(b.nodes, "controls", [], [_vi("lg_c", TP.FLOAT, [1, V])], b.inits)


def _filter_branch(op: str, V: int, src: str) -> tuple[onnx.GraphProto, onnx.GraphProto]:
    """If-branches over `src` [1, V] (outer scope): top-k / top-p applied as sllm.runtime.sampling.filter_logits
    does, or unchanged."""
    b = Builder(f"{op}_")
    if op == "topk":  # keep the logits >= the k-th largest, ties included (k >= V keeps all)
        k = b.op("Min", ["top_k", b.const(V)])
        vals, _ = b.op("TopK", [src, b.op("Unsqueeze", [k, b.const([0])])], 2, axis=-1)
        kth = b.op("Gather", [vals, b.op("Unsqueeze", [b.op("Sub", [k, b.const(1)]), b.const([0])])],
                   axis=1)  # [1, 1]
        b.op("Where", [b.op("Less", [src, kth]), b.const(-np.inf, np.float32), src], outputs=[f"{op}_y"])
    else:  # top-p: drop the tokens whose strictly more likely ones already hold p of the mass
        vals, order = b.op("TopK", [src, b.const([V])], 2, axis=-1)  # descending, ties by index (stable)
        probs = b.op("Softmax", [b.op("Cast", [vals], to=TP.DOUBLE)], axis=-1)
        before = b.op("Sub", [b.op("CumSum", [probs, b.const(1)]), probs])
        kept = b.op("Where", [b.op("GreaterOrEqual", [before, "top_p"]),
                              b.const(-np.inf, np.float32), vals])
        b.op("ScatterElements", [src, order, kept], axis=1, outputs=[f"{op}_y"])
    on = oh.make_graph(b.nodes, f"{op}_on", [], [_vi(f"{op}_y", TP.FLOAT, [1, V])], b.inits)
    off = oh.make_graph([oh.make_node("Identity", [src], [f"{op}_n"])], f"{op}_off", [],
                        [_vi(f"{op}_n", TP.FLOAT, [1, V])])
    return on, off


def _sample(V: int) -> onnx.GraphProto:
    """Nodes (as a graph to inline) from `lg_x` [1, V] and the step's uniform draw `u` to `tok_s` [1]:
    sllm.runtime.sampling.pick_next's temperature, top-k, top-p and inverse-CDF draw."""
    b = Builder("s_")
    x = b.op("Div", ["lg_x", "temperature"])
    for op, flag in (("topk", "use_top_k"), ("topp", "use_top_p")):
        on, off = _filter_branch(op, V, x)
        x = b.op("If", [flag], then_branch=on, else_branch=off)
    probs = b.op("Softmax", [b.op("Cast", [x], to=TP.DOUBLE)], axis=-1)
    cdf = b.op("CumSum", [probs, b.const(1)])  # [1, V]
    u = b.op("Mul", ["u", b.op("Gather", [cdf, b.const([V - 1])], axis=1)])  # [1, 1]
    count = b.op("ReduceSum", [b.op("Cast", [b.op("LessOrEqual", [cdf, u])], to=TP.INT64), b.const([1])], keepdims=0)
    b.op("Min", [count, b.const([V - 1])], outputs=["tok_s"])
    return oh.make_graph(b.nodes, "sampled", [], [_vi("tok_s", TP.INT64, [1])], b.inits)


def _rename(graph: onnx.GraphProto, local: dict[str, str]) -> None:
    """Rename values in place through `local`, in the graph and every subgraph below it."""
    for v in list(graph.input) + list(graph.output):
        v.name = local.get(v.name, v.name)
    for t in graph.initializer:
        t.name = local.get(t.name, t.name)
    for node in graph.node:
        node.input[:] = [local.get(x, x) for x in node.input]
        node.output[:] = [local.get(x, x) for x in node.output]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename(a.g, local)


def _inline(b: Builder, graph: onnx.GraphProto) -> None:
    """Append an If-branch graph's nodes and initializers to the body being built."""
    b.nodes.extend(graph.node)
    b.inits.extend(graph.initializer)


def _loop_body(kind: str, dec, cross: list[str], weights: tuple[str, str], eos_id: int,
               outer: Builder) -> onnx.GraphProto:
    """The Loop body of one kind of sentence: iteration i feeds the token picked at i - 1 (bos first)
    at position i and picks the next. kind "plain": argmax; "controls": the repetition controls, then
    argmax; "sampled": the controls (neutral inputs leave the logits bit for bit unchanged), then
    temperature / top-k / top-p and the step's uniform draw. No If runs per token on the greedy kinds."""
    cfg = dec.cfg
    V, L, H, hd = cfg.vocab_size, dec.n_layers, dec.n_heads, dec.head_dim
    body = Builder(f"l{kind}_", weights_to=outer)
    body.op("Identity", ["seq_in"], outputs=["seq"])
    body.op("Identity", ["cur_in"], outputs=["cur"])
    _decoder_step(body, dec, "prev_in", "kv_in", cross, weights, "logits_b", "kv_out")
    body.op("Reshape", ["logits_b", body.const([1, V])], outputs=["lg"])
    if kind == "plain":
        tok = body.op("ArgMax", ["lg"], axis=-1, keepdims=0)  # [1]
    else:
        _inline(body, _controls(eos_id, V))  # lg -> lg_c
        if kind == "controls":
            tok = body.op("ArgMax", ["lg_c"], axis=-1, keepdims=0)
        else:
            body.op("Identity", ["lg_c"], outputs=["lg_x"])
            body.op("Gather", ["uniforms", body.op("Unsqueeze", ["i", body.const([0])])], outputs=["u_flat"])
            body.op("Unsqueeze", ["u_flat", body.const([0])], outputs=["u"])  # [1, 1]
            _inline(body, _sample(V))  # lg_x, u -> tok_s
            tok = "tok_s"
    body.op("Identity", [tok], outputs=["tok_scan"])
    body.op("Reshape", [tok, body.const([1, 1])], outputs=["prev_out"])
    body.op("Not", [body.op("Equal", [body.op("Squeeze", [tok, body.const([0])]), body.const(eos_id)])],
            outputs=["cond_out"])
    body.op("Concat", ["seq_in", tok], axis=0, outputs=["seq_out"])
    body.op("ScatterElements", ["cur_in", body.op("Unsqueeze", ["i", body.const([0])]), tok], axis=0,
            outputs=["cur_out"])
    graph = oh.make_graph(
        body.nodes, f"sentence_step_{kind}",
        [_vi("i", TP.INT64, []), _vi("cond_in", TP.BOOL, []), _vi("prev_in", TP.INT64, [1, 1]),
         _vi("kv_in", TP.FLOAT, [L, 2, 1, H, "p", hd]), _vi("seq_in", TP.INT64, ["n"]), _vi("cur_in", TP.INT64, ["w"])],
        [_vi("cond_out", TP.BOOL, []), _vi("prev_out", TP.INT64, [1, 1]), _vi("kv_out", TP.FLOAT, [L, 2, 1, H, "p1", hd]),
         _vi("seq_out", TP.INT64, ["n1"]), _vi("cur_out", TP.INT64, ["w"]), _vi("tok_scan", TP.INT64, [1])],
        body.inits)
    # sibling bodies get their own names (values defined inside this body, its subgraphs included)
    local: dict[str, str] = {}

    def collect(g: onnx.GraphProto) -> None:
        for v in g.input:
            local[v.name] = f"{kind}/{v.name}"
        for t in g.initializer:
            local[t.name] = f"{kind}/{t.name}"
        for n in g.node:
            for x in n.output:
                local[x] = f"{kind}/{x}"
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    collect(a.g)

    collect(graph)
    _rename(graph, local)
    return graph


def sentence_graph(dec, bos_id: int, eos_id: int) -> onnx.ModelProto:
    """sentence.onnx: one sentence from one vector in one run() (a Loop over the decoder step, batch 1).
    tokens int64 [n]: the picked tokens, the last one eos unless max_tokens ended the sentence.
    The kind of sentence (greedy or sampled, controls or not) is chosen once per call, outside the loop."""
    cfg = dec.cfg
    d, L, H, hd = cfg.d_model, dec.n_layers, dec.n_heads, dec.head_dim
    b = Builder("d_")
    cross = _cross_constant(b, dec, "memory")  # once per sentence, outside the loop
    weights = _embeddings(b, dec)
    kv0 = b.const(np.zeros((L, 2, 1, H, 0, hd), np.float32), np.float32)
    cur0 = b.op("Expand", [b.const(-1), b.op("Shape", ["earlier"], start=1, end=2)])  # [W] of -1
    start = ["max_tokens", b.const(True, np.bool_), b.const([[bos_id]]), kv0, "history", cur0]

    def branch(kind: str) -> onnx.GraphProto:
        out = f"tokens_{kind}"
        nodes = [oh.make_node("Loop", start, [f"{kind}_prev", f"{kind}_kv", f"{kind}_seq", f"{kind}_cur", out],
                              body=_loop_body(kind, dec, cross, weights, eos_id, b))]  # + the scan of picked tokens
        return oh.make_graph(nodes, kind, [], [_vi(out, TP.INT64, ["n", 1])])

    greedy = oh.make_graph([oh.make_node("If", ["controls"], ["tokens_greedy"], then_branch=branch("controls"),
                                         else_branch=branch("plain"))], "greedy", [],
                           [_vi("tokens_greedy", TP.INT64, ["n", 1])])
    picked = b.op("If", ["greedy"], then_branch=greedy, else_branch=branch("sampled"))
    b.op("Reshape", [picked, b.const([-1])], outputs=["tokens"])
    f32, i64 = TP.FLOAT, TP.INT64
    inputs = [_vi("memory", f32, [1, d]), _vi("max_tokens", i64, []), _vi("controls", TP.BOOL, []),
              _vi("penalty", f32, []), _vi("ngram", i64, []), _vi("history", i64, ["history"]),
              _vi("earlier", i64, ["sentences", "width"]), _vi("greedy", TP.BOOL, []), _vi("temperature", f32, []),
              _vi("use_top_k", TP.BOOL, []), _vi("top_k", i64, []), _vi("use_top_p", TP.BOOL, []),
              _vi("top_p", TP.DOUBLE, []), _vi("uniforms", TP.DOUBLE, ["draws"])]
    return _model(b, inputs, [_vi("tokens", i64, ["n"])], "sentence_decode")


# ---------------------------------------------------------------- the token-level baseline OPT

def check_supported(config) -> None:
    """The OPT variants restated here: layer norm before each sub-block (every OPT but 350m) and no
    projection between word embeddings and the hidden size."""
    if not config.do_layer_norm_before or config.word_embed_proj_dim != config.hidden_size:
        raise ValueError("only pre-LN OPT without project_in/out (every OPT size but 350m) can be restated")


def _opt_blocks(b: Builder, layers, h: str, x: str, final_ln, heads: int, activation: str, past_kv: str,
                mask: str = "") -> tuple[str, list[str]]:
    """OPT's pre-LN decoder blocks (Hugging Face's parameter names, as modeling.opt_block's too) from
    h = LayerNorm_0(x) and the residual stream x [B, T, d] -> (final_ln(x) after the last block [B, T, d],
    each layer's present [2, B, H, P+T, hd]). mask: a raw [B, P+T] int32 key mask (1 = attend) or none."""
    presents = []
    for i, layer in enumerate(layers):
        a = layer.self_attn
        qkv_w = np.concatenate([_np(p.weight) for p in (a.q_proj, a.k_proj, a.v_proj)])
        qkv_b = np.concatenate([_np(p.bias) for p in (a.q_proj, a.k_proj, a.v_proj)])
        past = b.op("Gather", [past_kv, b.const(i)], axis=0)  # [2, B, H, P, hd]
        y, present = _attention(b, h, qkv_w, qkv_b, heads, past=past, mask=mask, causal=True)
        presents.append(present)
        o = _linear_nobias(b, y, a.out_proj)
        h, x = _skip_ln(b, o, x, layer.final_layer_norm, b.weight("o_b", _np(a.out_proj.bias)))
        f = b.op("MatMul", [h, b.weight("fc1_w", _np(layer.fc1.weight).T)])
        if activation == "relu":
            f = b.op("Relu", [b.op("Add", [f, b.weight("fc1_b", _np(layer.fc1.bias))])])
        elif activation == "gelu":
            f = b.op("BiasGelu", [f, b.weight("fc1_b", _np(layer.fc1.bias))], domain=MS)
        else:
            raise ValueError(f"activation {activation!r} is not restated in the fused graph")
        m = b.op("MatMul", [f, b.weight("fc2_w", _np(layer.fc2.weight).T)])
        nxt = layers[i + 1].self_attn_layer_norm if i + 1 < len(layers) else final_ln
        h, x = _skip_ln(b, m, x, nxt, b.weight("fc2_b", _np(layer.fc2.bias)))
    return h, presents


def _stack_presents(b: Builder, presents: list[str], out: str) -> None:
    b.op("Concat", [b.op("Unsqueeze", [p, b.const([0])]) for p in presents], outputs=[out], axis=0)


def baseline_graph(model) -> onnx.ModelProto:
    """baseline.onnx of an OPTForCausalLM (pre-LN, no project_in/out): the contract of
    sllm.export.baseline_onnx, the same fused blocks as the edge graphs."""
    cfg = model.config
    check_supported(cfg)
    dec = model.model.decoder
    layers = list(dec.layers)
    H, d, V = cfg.num_attention_heads, cfg.hidden_size, cfg.vocab_size
    hd, L = d // H, len(layers)
    b = Builder("b_")
    P = b.op("Shape", ["past_kv"], start=4, end=5)
    T = b.op("Shape", ["ids"], start=1, end=2)
    start = b.op("Add", [P, b.const([dec.embed_positions.offset])])  # OPT's learned positions start at 2
    pos = b.op("Slice", [b.weight("pos_emb", _np(dec.embed_positions.weight)), start, b.op("Add", [start, T]),
                         b.const([0])])  # [T, d]
    emb = b.weight("tok_emb", _np(dec.embed_tokens.weight))
    tok = b.op("Gather", [emb, "ids"])
    h, x = _skip_ln(b, tok, pos, layers[0].self_attn_layer_norm)
    h, presents = _opt_blocks(b, layers, h, x, dec.final_layer_norm, H, cfg.activation_function, "past_kv")
    last = b.op("Slice", [h, b.const([-1]), b.const([np.iinfo(np.int64).max]), b.const([1])])  # [B, 1, d]
    same = model.lm_head.weight.data_ptr() == dec.embed_tokens.weight.data_ptr()
    lm = emb if same else b.weight("lm_head", _np(model.lm_head.weight))
    b.op("MatMul", [last, b.op("Transpose", [lm], perm=[1, 0])], outputs=["logits"])
    _stack_presents(b, presents, "present_kv")
    return _model(b, [_vi("ids", TP.INT64, ["batch", "step"]), _vi("past_kv", TP.FLOAT, [L, 2, "batch", H, "past", hd])],
                  [_vi("logits", TP.FLOAT, ["batch", 1, V]), _vi("present_kv", TP.FLOAT, [L, 2, "batch", H, "total", hd])],
                  "opt_baseline")


def cloud_graph(model) -> onnx.ModelProto:
    """The cloud step of a GraftedOPT (pre-LN with a final LayerNorm; modeling.opt_graft), the same fused
    blocks as the baseline's: vectors [B, T, d] at sentence positions [B, T] (int64) after past_kv
    [L, 2, B, H, P, hd], mask [B, P+T] int32 (1 = a real position: padding in the past of a shorter
    sequence is 0) -> hidden [B, T, d], stop_logits [B, T, 2], present_kv [L, 2, B, H, P+T, hd]."""
    cfg = model.config
    check_supported(cfg)
    if model.final_layer_norm is None:
        raise ValueError("only pre-LN OPT with a final LayerNorm can be restated")
    layers = list(model.layers)
    H, d, L = model.heads, model.hidden_size, len(layers)
    hd = d // H
    b = Builder("c_")
    pos = b.op("Gather", [b.weight("pos_emb", _np(model.embed_positions.weight)),
                          b.op("Add", ["positions", b.const(2)])])  # [B, T, d]: OPT's learned positions start at 2
    h, x = _skip_ln(b, "vectors", pos, layers[0].self_attn_layer_norm)
    h, presents = _opt_blocks(b, layers, h, x, model.final_layer_norm, H, cfg.activation_function, "past_kv",
                              mask="mask")
    b.op("Identity", [h], outputs=["hidden"])
    b.op("Add", [b.op("MatMul", [h, b.weight("stop_w", _np(model.stop_head.weight).T)]),
                 b.weight("stop_b", _np(model.stop_head.bias))], outputs=["stop_logits"])
    _stack_presents(b, presents, "present_kv")
    return _model(b, [_vi("vectors", TP.FLOAT, ["batch", "step", d]), _vi("positions", TP.INT64, ["batch", "step"]),
                      _vi("past_kv", TP.FLOAT, [L, 2, "batch", H, "past", hd]),
                      _vi("mask", TP.INT32, ["batch", "total"])],
                  [_vi("hidden", TP.FLOAT, ["batch", "step", d]), _vi("stop_logits", TP.FLOAT, ["batch", "step", 2]),
                   _vi("present_kv", TP.FLOAT, [L, 2, "batch", H, "total", hd])], "grafted_opt_step")


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return Path(path)
