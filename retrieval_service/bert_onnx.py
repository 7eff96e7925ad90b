"""The BERT sentence encoder as an ONNX graph, run by ONNX Runtime: the CPU path of TextEncoder.

Same math as bert.py (the Flax reference; tests check the two agree): embeddings + LayerNorm, post-LN layers, masked
mean pooling, L2 norm. The graph is written from the checkpoint's tensors (no export step, no torch; cached on disk per weights hash) with
ONNX Runtime's fused CPU kernels: EmbedLayerNormalization, Attention (Q/K/V in one GEMM, padding mask from the
lengths), SkipLayerNormalization (residual + LayerNorm) and BiasGelu. On a 2-core x86 host it encodes MiniLM
passages ~2x faster than XLA:CPU and imports no JAX, which keeps a serving process small.

    runner = OnnxBertRunner(cached_onnx_model(model_dir, cfg, weights_sha256, cache_dir), max_batch=64)
    vectors = runner(token_ids, mask)   # int32[B, T], bool[B, T] (right padding) -> float32[B, H] unit rows
"""

import os
import pathlib
import shutil

import numpy as np

from retrieval_service.bert_weights import BertConfig, read_bert_tensors

OPSET = 18  # reductions take their axes as an input from 18 on
MS_DOMAIN = "com.microsoft"


def _gelu_node(cfg: BertConfig, helper, x: str, bias: str, out: str) -> list:
    if cfg.hidden_act == "gelu":  # HF "gelu" is the exact erf form, which BiasGelu computes
        return [helper.make_node("BiasGelu", [x, bias], [out], domain=MS_DOMAIN)]
    if cfg.hidden_act in ("gelu_new", "gelu_pytorch_tanh"):
        return [helper.make_node("FastGelu", [x, bias], [out], domain=MS_DOMAIN)]
    return [helper.make_node("Add", [x, bias], [out + "_biased"]), helper.make_node("Relu", [out + "_biased"], [out])]


def build_onnx_model(cfg: BertConfig, tensors: dict[str, np.ndarray], weights_file=None):
    """-> onnx.ModelProto: input_ids int32[B, T], attention_mask int32[B, T] -> embeddings float32[B, H].

    weights_file: an open binary file; when given, every weight matrix is written there (page-aligned, so ONNX
    Runtime can map it) and the model only refers to it (`location` = the file's name), instead of holding copies.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h = cfg.hidden_size
    initializers, nodes = [], []

    def weight(name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, np.float32)
        if weights_file is None or array.ndim < 2:
            initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = -(-weights_file.tell() // 4096) * 4096
        weights_file.seek(offset)
        weights_file.write(array.tobytes())
        proto = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                            data_location=TensorProto.EXTERNAL)
        for key, value in (("location", pathlib.Path(weights_file.name).name), ("offset", offset),
                           ("length", array.nbytes)):
            proto.external_data.add(key=key, value=str(value))
        initializers.append(proto)
        return name

    def tensor(hf_name: str, transpose: bool = False) -> str:
        array = tensors[hf_name]
        return weight(hf_name, array.T if transpose else array)

    nodes.append(helper.make_node("Mul", ["input_ids", "zero_i32"], ["segment_ids"]))  # one segment: type 0
    initializers.append(numpy_helper.from_array(np.zeros((), np.int32), "zero_i32"))
    nodes.append(helper.make_node(
        "EmbedLayerNormalization",
        ["input_ids", "segment_ids", tensor("embeddings.word_embeddings.weight"),
         tensor("embeddings.position_embeddings.weight"), tensor("embeddings.token_type_embeddings.weight"),
         tensor("embeddings.LayerNorm.weight"), tensor("embeddings.LayerNorm.bias"), "attention_mask"],
        ["x0", "mask_index"], domain=MS_DOMAIN, epsilon=cfg.layer_norm_eps))

    x = "x0"
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        qkv_w = np.concatenate([tensors[p + f"attention.self.{n}.weight"].T for n in ("query", "key", "value")], 1)
        qkv_b = np.concatenate([tensors[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
        nodes += [
            helper.make_node("Attention", [x, weight(p + "qkv.weight", qkv_w), weight(p + "qkv.bias", qkv_b),
                                           "mask_index"], [p + "context"], domain=MS_DOMAIN,
                             num_heads=cfg.num_heads),
            helper.make_node("MatMul", [p + "context", tensor(p + "attention.output.dense.weight", True)],
                             [p + "attn_out"]),
            helper.make_node("SkipLayerNormalization",
                             [p + "attn_out", x, tensor(p + "attention.output.LayerNorm.weight"),
                              tensor(p + "attention.output.LayerNorm.bias"),
                              tensor(p + "attention.output.dense.bias")],
                             [p + "x_attn"], domain=MS_DOMAIN, epsilon=cfg.layer_norm_eps),
            helper.make_node("MatMul", [p + "x_attn", tensor(p + "intermediate.dense.weight", True)],
                             [p + "inter"]),
        ]
        nodes += _gelu_node(cfg, helper, p + "inter", tensor(p + "intermediate.dense.bias"), p + "act")
        nodes += [
            helper.make_node("MatMul", [p + "act", tensor(p + "output.dense.weight", True)], [p + "ffn_out"]),
            helper.make_node("SkipLayerNormalization",
                             [p + "ffn_out", p + "x_attn", tensor(p + "output.LayerNorm.weight"),
                              tensor(p + "output.LayerNorm.bias"), tensor(p + "output.dense.bias")],
                             [p + "x_out"], domain=MS_DOMAIN, epsilon=cfg.layer_norm_eps),
        ]
        x = p + "x_out"

    # Masked mean over tokens (count clamped like sentence-transformers), then L2 normalisation (eps like torch).
    initializers += [numpy_helper.from_array(np.asarray([1], np.int64), "axis1"),
                     numpy_helper.from_array(np.asarray([-1], np.int64), "axis_last"),
                     numpy_helper.from_array(np.asarray(1e-9, np.float32), "count_eps"),
                     numpy_helper.from_array(np.asarray(1e-12, np.float32), "norm_eps")]
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis_last"], ["mask_3d"]),
        helper.make_node("Mul", [x, "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask_3d", "axis1"], ["count"], keepdims=0),
        helper.make_node("Max", ["count", "count_eps"], ["count_safe"]),
        helper.make_node("Div", ["summed", "count_safe"], ["pooled"]),
        helper.make_node("ReduceL2", ["pooled", "axis_last"], ["norm"], keepdims=1),
        helper.make_node("Max", ["norm", "norm_eps"], ["norm_safe"]),
        helper.make_node("Div", ["pooled", "norm_safe"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes, "bert_sentence_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["batch", "length"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "length"])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", h])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="retrieval_service.bert_onnx")
    model.ir_version = 8
    return model


GRAPH_VERSION = 1  # bump when build_onnx_model changes, so cached graphs are rebuilt


def cached_onnx_model(model_dir, cfg: BertConfig, weights_sha256: str, cache_dir) -> pathlib.Path:
    """model.onnx + weights.bin for a checkpoint under cache_dir/<weights sha>-v<GRAPH_VERSION>/, written once.

    Serving processes then load the graph from disk: ONNX Runtime maps the weights file rather than the process
    holding the protobuf copies, and replicas on one host share it in the page cache.
    """
    import onnx

    target = pathlib.Path(cache_dir) / f"{weights_sha256[:16]}-v{GRAPH_VERSION}"
    if (target / "model.onnx").exists():
        return target / "model.onnx"
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "weights.bin", "wb") as weights_file:
        model = build_onnx_model(cfg, read_bert_tensors(model_dir, cfg), weights_file)
    onnx.save_model(model, str(tmp / "model.onnx"))
    onnx.checker.check_model(str(tmp / "model.onnx"))
    try:
        os.replace(tmp, target)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "model.onnx"


class OnnxBertRunner:
    """Runs the encoder graph with ONNX Runtime on CPU; batches take any shape (no buckets, no compilation).

    threads: intra-op threads (None = ONNX Runtime's default, one per physical core).
    """

    platform = "onnxruntime-cpu"

    def __init__(self, model_path, *, max_batch: int, threads: int | None = None):
        """model_path: a graph written by `cached_onnx_model`."""
        import onnxruntime as ort

        self.max_batch = max_batch
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads sleep instead of spinning: the host's cores are shared (the trainer's host work,
        # other replicas), and spinning measured ~2x slower per call on a busy 2-core host.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.description = f"onnxruntime {ort.__version__} CPU (fused BERT kernels), fp32"

    def __call__(self, token_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """token_ids: int32[B, T], mask: bool[B, T] (True = real token, right padding) -> float32[B, H]."""
        return self._session.run(["embeddings"], {"input_ids": np.ascontiguousarray(token_ids, np.int32),
                                                  "attention_mask": mask.astype(np.int32)})[0]

    def warmup(self, lengths) -> None:
        """Nothing to compile; one call allocates ONNX Runtime's buffers."""
        self(np.zeros((1, 8), np.int32), np.ones((1, 8), bool))
