"""Export a trained zoo model to ONNX and compress it: fp32, static QDQ int8, fp16 (no Flower, Prefect or minio).

Every exported graph takes the dataset's *raw* inputs (MNIST pixels 0–255, digits 0–16;
other datasets their features as loaded) with the scaling of ``clients.data`` inside the
graph, and returns one output, ``probabilities`` (N, classes) in float32, so a server
needs nothing but onnxruntime and the input schema. Torch models export through
``torch.onnx`` (the TorchScript exporter: the dynamo one needs onnxscript, which this
project does not install); the scikit-learn logistic regression through ``skl2onnx``.

Variants:

- ``fp32``: the exported graph as it is.
- ``int8``: onnxruntime's static quantization in QDQ form (weights and activations
  signed int8 per tensor, MinMax calibration) of the layers' ops (``INT8_OPS``). Static, not dynamic:
  dynamic quantization turns convolutions into ``ConvInteger``, which ran 0.1–0.3× the
  fp32 throughput on this CPU, while static QDQ lets onnxruntime fuse int8 kernels: the
  CNN's session runs ``QLinearConv`` with the ReLU folded in, ``NhwcMaxPool`` and ``QGemm``
  (fp32's runs NCHWc ``Conv``), 2.3–2.9× fp32 at batch 64 with 2 threads on this CPU (AVX-512
  VNNI), interleaved in one process. Measured there and kept as they are, each within the
  noise of that figure and of accuracy (±0.001 on MNIST): per-channel weights, uint8
  activations, the QOperator format, and the first convolution (1 input channel, a 9-deep
  product, the one layer int8 runs slower than fp32) left in float32.
- ``fp16``: weights and activations in float16 with float32 inputs and outputs (a cast at
  each end), written here (``to_fp16``): ``onnxconverter-common``'s converter is not a
  dependency, and the zoo's graphs use only ops whose float16 form is the same op. Made
  only where the serving machine's onnxruntime runs it (``fp16_unsupported``).
"""

from __future__ import annotations

import copy
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.models import Model

VARIANTS = ("fp32", "int8", "fp16")
OPSET = 17  # ONNX opset of the exported graphs (onnxruntime 1.32 runs up to 23)
INPUT, OUTPUT = "input", "probabilities"
# the ops int8 quantizes: the layers' arithmetic. Not the softmax (its int8 output would put the probabilities
# on a 1/255 grid) nor the elementwise tail of the scikit-learn graph (quantized, its one-vs-rest
# normalization lost the classes: 0.10 accuracy on MNIST) nor the input scaling.
INT8_OPS = ("Conv", "Gemm", "MatMul", "MaxPool", "Relu", "Flatten")
# raw input value that clients.data maps to 1.0 (the graph divides by it); datasets not listed are used as loaded
_RAW_INPUT_MAX = {"mnist": 255.0, "fashion-mnist": 255.0, "digits": 16.0}


@dataclass(frozen=True)
class Exported:
    """One ONNX variant of a model and what it takes."""

    variant: str  # fp32, int8 or fp16
    onnx: bytes  # the serialized ModelProto
    input_shape: tuple[int, ...]  # one example's shape (the graph takes a batch: (N, *input_shape))
    raw_input_max: float | None  # the raw input value the graph scales to 1.0 (None: inputs as loaded)


def raw_input_max(dataset_name: str) -> float | None:
    """Return the raw input value that ``clients.data`` scales to 1.0 for ``dataset_name`` (None: no scaling)."""
    return _RAW_INPUT_MAX.get(dataset_name)


def to_raw(x: np.ndarray, dataset_name: str) -> np.ndarray:
    """Return the model inputs ``x`` (as ``clients.data`` loads them) as the raw inputs an exported graph takes."""
    top = raw_input_max(dataset_name)
    return np.ascontiguousarray(x if top is None else x * np.float32(top), dtype=np.float32)


def export_fp32(model: Model, *, dataset_name: str) -> Exported:
    """Export ``model`` (a zoo model on any device) to an fp32 ONNX graph with its input scaling inside.

    Raises:
        ValueError: the model is not one of the zoo's.
    """
    top = raw_input_max(dataset_name)
    if model.name in ("logreg", "gnb"):
        data = _export_sklearn(model, top)
    elif hasattr(model, "network"):
        data = _export_torch(model, top)
    else:
        raise ValueError(f"cannot export model {model.name!r}: expected a zoo model built with build_model")
    return Exported("fp32", data, tuple(model.input_shape), top)


def _export_torch(model: Any, top: float | None) -> bytes:
    """Export a torch zoo network as softmax(network(x / top)) with a dynamic batch axis."""
    import torch

    class Serving(torch.nn.Module):
        """The network with the raw-input scaling in front and a softmax behind."""

        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if top is not None:
                x = x * (1.0 / top)
            return torch.softmax(self.network(x), dim=1)

    network = copy.deepcopy(model.network).to("cpu").eval()
    buffer = io.BytesIO()
    example = torch.zeros((1, *model.input_shape), dtype=torch.float32)
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, not gone; see the module docstring
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Serving(network).eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return buffer.getvalue()


def _estimator(model: Any) -> Any:
    """Return the fitted scikit-learn estimator a numpy zoo model is: SGDClassifier (logreg) or GaussianNB (gnb)."""
    if model.name == "gnb":
        from sklearn.naive_bayes import GaussianNB

        estimator = GaussianNB()
        for attribute, value in model.parameters().items():
            setattr(estimator, attribute, value)
        estimator.class_count_ = estimator.class_prior_.copy()
    else:
        from sklearn.linear_model import SGDClassifier

        arrays = model.get_arrays()
        estimator = SGDClassifier(loss="log_loss")
        estimator.coef_ = arrays["coef"].astype(np.float64)
        estimator.intercept_ = arrays["intercept"].astype(np.float64)
    estimator.classes_ = np.arange(model.num_classes)
    return estimator


def _export_sklearn(model: Any, top: float | None) -> bytes:
    """Export a numpy zoo model as its scikit-learn estimator (skl2onnx) behind a flatten-and-scale step."""
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    features = int(np.prod(model.input_shape))
    estimator = _estimator(model)
    core = convert_sklearn(estimator, initial_types=[("features", FloatTensorType([None, features]))],
                           target_opset={"": OPSET, "ai.onnx.ml": 3}, options={id(estimator): {"zipmap": False}})
    graph = core.graph
    # in front: flatten (N, *input_shape) to (N, F) and scale; behind: only the probabilities
    front = [helper.make_node("Flatten", [INPUT], ["flat"], axis=1)]
    scaled = "flat"
    if top is not None:
        graph.initializer.append(helper.make_tensor("inverse_raw_max", TensorProto.FLOAT, [], [1.0 / top]))
        front.append(helper.make_node("Mul", ["flat", "inverse_raw_max"], ["scaled"]))
        scaled = "scaled"
    probability_name = next(o.name for o in graph.output if o.name != "label")
    for node in graph.node:
        node.input[:] = [scaled if name == "features" else name for name in node.input]
        node.output[:] = [OUTPUT if name == probability_name else name for name in node.output]
    nodes = _needed(front + list(graph.node), OUTPUT)  # skl2onnx's label branch is not served
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *model.input_shape]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", model.num_classes]))
    onnx.checker.check_model(core)
    return core.SerializeToString()


def _needed(nodes: list[Any], output: str) -> list[Any]:
    """Return the nodes (in order) that ``output`` depends on."""
    wanted, kept = {output}, []
    for node in reversed(nodes):
        if wanted & set(node.output):
            kept.append(node)
            wanted |= set(node.input)
    return kept[::-1]


def framework_probabilities(model: Model, x: np.ndarray) -> np.ndarray:
    """Return the framework's class probabilities (float32) for model inputs ``x`` (as loaded, not raw)."""
    if model.name in ("logreg", "gnb"):
        return np.exp(model._log_proba(np.asarray(x, dtype=np.float32).reshape(len(x), -1))).astype(np.float32)
    import torch

    from clients._torch_models import predict_logits

    logits = predict_logits(model.network, np.ascontiguousarray(x, dtype=np.float32), batch_size=512,
                            device=model.device)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def session(onnx_bytes: bytes, *, threads: int = 0):
    """Return a plain onnxruntime InferenceSession on the CPU (``threads`` 0: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are not the user's to fix
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def onnx_probabilities(onnx_bytes: bytes, raw_x: np.ndarray, *, batch_size: int = 256, threads: int = 0
                       ) -> np.ndarray:
    """Return the ONNX graph's probabilities for raw inputs ``raw_x``, ``batch_size`` rows at a time."""
    run = session(onnx_bytes, threads=threads)
    chunks = [run.run([OUTPUT], {INPUT: raw_x[i:i + batch_size]})[0] for i in range(0, len(raw_x), batch_size)]
    return np.concatenate(chunks).astype(np.float32)


def quantize_int8(fp32: Exported, calibration_raw_x: np.ndarray, *, batch_size: int = 32) -> Exported:
    """Return the static QDQ int8 variant of ``fp32``, calibrated on raw inputs ``calibration_raw_x`` (MinMax).

    Raises:
        ValueError: no calibration examples.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration_raw_x) == 0:
        raise ValueError("static int8 quantization needs calibration examples, got 0: pass some inputs")

    class Batches(CalibrationDataReader):
        """Feed the calibration examples in batches."""

        def __init__(self) -> None:
            self._batches = iter(range(0, len(calibration_raw_x), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._batches, None)
            return None if start is None else {INPUT: calibration_raw_x[start:start + batch_size]}

    with tempfile.TemporaryDirectory(prefix="fedcompare-quant-") as folder:
        source, prepared, target = (Path(folder) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(fp32.onnx)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), Batches(), quant_format=QuantFormat.QDQ, per_channel=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(INT8_OPS))
        data = target.read_bytes()
    return Exported("int8", data, fp32.input_shape, fp32.raw_input_max)


def to_fp16(fp32: Exported) -> Exported:
    """Return the float16 variant of ``fp32``: float16 weights and compute, float32 input and output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(fp32.onnx)
    graph = model.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float16)))
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16
        node.input[:] = [f"{INPUT}_fp16" if name == INPUT else name for name in node.input]
        node.output[:] = [f"{OUTPUT}_fp16" if name == OUTPUT else name for name in node.output]
    graph.node.insert(0, helper.make_node("Cast", [INPUT], [f"{INPUT}_fp16"], to=TensorProto.FLOAT16))
    graph.node.append(helper.make_node("Cast", [f"{OUTPUT}_fp16"], [OUTPUT], to=TensorProto.FLOAT))
    del graph.value_info[:]  # intermediate types changed; onnxruntime infers them again
    onnx.checker.check_model(model)
    return Exported("fp16", model.SerializeToString(), fp32.input_shape, fp32.raw_input_max)


def fp16_unsupported(fp16: Exported) -> str | None:
    """Return why this machine's onnxruntime cannot run ``fp16`` (None: it can), in one line."""
    try:
        session(fp16.onnx).run([OUTPUT], {INPUT: np.zeros((1, *fp16.input_shape), dtype=np.float32)})
    except Exception as exc:  # onnxruntime raises its own classes: a missing float16 kernel is one of them
        return f"onnxruntime's CPU provider cannot run it: {str(exc).splitlines()[0][:200]}"
    return None


def compress(fp32: Exported, calibration_raw_x: np.ndarray | None) -> tuple[dict[str, Exported], dict[str, str]]:
    """Return the variants of ``fp32`` (itself included) and, for each variant left out, why.

    ``calibration_raw_x`` None means no data the flow may see: no int8 variant.
    """
    variants, skipped = {"fp32": fp32}, {}
    if calibration_raw_x is None:
        skipped["int8"] = "static quantization needs calibration data, and the nodes' data cannot be pooled"
    else:
        variants["int8"] = quantize_int8(fp32, calibration_raw_x)
    fp16 = to_fp16(fp32)
    reason = fp16_unsupported(fp16)
    if reason:
        skipped["fp16"] = reason
    else:
        variants["fp16"] = fp16
    return variants, skipped
