"""Ways to run the same network on the CPU, each returning (logits, last-block activations) for a batch."""

import contextlib
import copy
import functools
import logging
import os
import tempfile
import threading
import warnings

# ONNX Runtime's telemetry (Microsoft's 1DS events SDK) is on by default: it writes a device id and an event
# database under ~/.cache/Microsoft and a mat-debug-<pid>.log into /tmp from every process that imports it. It reads
# this switch once, on its first import, so it is set before anything can import onnxruntime.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from model.errors import CovidScanError  # noqa: E402
from model.network import feature_layer  # noqa: E402

logger = logging.getLogger(__name__)

# eager: the reference and the last fallback; channels_last: for other devices; onnx: float32 ONNX Runtime, the
# CPU default when there is no fast path; int8: the fast path, ONNX Runtime on the statically quantized file written
# by `scripts/export.py --int8` beside the checkpoint (model/quantize.py); bf16: PyTorch bfloat16, measured beside
# them. A TorchScript backend was measured too (benchmarks/README.md) and dropped.
BACKENDS = ("eager", "channels_last", "bf16", "onnx", "int8")
# With no backend named, the CPU runs FAST_BACKEND when its file exists, belongs to the checkpoint and the CPU has
# int8 dot-product instructions, else DEFAULT_BACKEND; benchmarks/bench_fast_path.py has the figures behind this.
DEFAULT_BACKEND = "onnx"
FAST_BACKEND = "int8"
BACKEND_ENVIRONMENT_VARIABLE = "COVIDSCAN_INFERENCE_BACKEND"
# Backends that only make sense on the CPU; other devices run eager or channels_last.
CPU_ONLY_BACKENDS = ("bf16", "onnx", "int8")
# /proc/cpuinfo flags of the int8 dot products ONNX Runtime's kernels use (x86 VNNI and AMX, Arm's SDOT/UDOT).
# Without them its u8 x s8 products can saturate and are barely faster than float32, so float32 stays the default.
INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp")
ONNX_OPSET = 18
# The ONNX exporter logs each optimisation pass at INFO.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")

_ONNX_EXPORTS = {}  # (checkpoint sha256, input shape) -> ONNX bytes


class BackendError(CovidScanError):
    """An inference backend is unknown, unavailable here, or failed to build."""


class FeatureNetwork(nn.Module):
    """A torchvision ResNet that returns its logits and the output of its last convolutional block."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images):
        network = self.network
        x = network.maxpool(network.relu(network.bn1(network.conv1(images))))
        x = network.layer3(network.layer2(network.layer1(x)))
        features = feature_layer(network)(x)
        logits = network.fc(torch.flatten(network.avgpool(features), 1))
        return logits, features


def requested_backend(backend=None):
    """The backend asked for: the given name, else ``COVIDSCAN_INFERENCE_BACKEND``, else ``"auto"``."""
    return (backend or os.environ.get(BACKEND_ENVIRONMENT_VARIABLE) or "auto").strip().lower()


def resolve_backend(backend=None, *, device="cpu"):
    """The backend to use without a fast-path file: the given name, else the variable, else the default.

    ``auto`` gives ``DEFAULT_BACKEND`` on the CPU; ``build_runtime_for_predictor`` upgrades it to the fast path.
    """
    requested = requested_backend(backend)
    if requested == "auto":
        return DEFAULT_BACKEND if torch.device(device).type == "cpu" else "eager"
    if requested not in BACKENDS:
        raise BackendError(f"unknown inference backend {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
    if requested in CPU_ONLY_BACKENDS and torch.device(device).type != "cpu":
        raise BackendError(f"inference backend {requested!r} runs on the CPU only, not on {device}")
    return requested


def cpu_int8_support(cpuinfo_path="/proc/cpuinfo"):
    """``(True, flag)`` when this CPU has int8 dot-product instructions, else ``(False, reason)``."""
    try:
        text = open(cpuinfo_path, encoding="ascii", errors="replace").read()
    except OSError:
        return False, f"cannot read {cpuinfo_path} to tell whether this CPU has int8 dot-product instructions"
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    for flag in INT8_CPU_FLAGS:
        if flag in flags:
            return True, flag
    return False, f"this CPU has no int8 dot-product instructions ({', '.join(INT8_CPU_FLAGS)})"


def fast_path_file(checkpoint_path, sha256):
    """``(path, bytes, None)`` when the checkpoint has an int8 file made from it, else ``(None, None, why not)``.

    The file is read once, here; its bytes are what the int8 runtime runs.
    """
    from model.quantize import fast_path_path, read_fast_path_metadata

    if not checkpoint_path:
        return None, None, "the checkpoint was not loaded from a file, so it has no int8 file beside it"
    path = fast_path_path(checkpoint_path)
    if not path.is_file():
        return None, None, f"there is no int8 file at {path} (scripts/export.py --int8 DATA writes it)"
    try:
        data = path.read_bytes()
        recorded = read_fast_path_metadata(data).get("checkpoint_sha256")
    except Exception as error:  # onnx's DecodeError and OSError alike: a damaged file is not run
        return None, None, f"{path} cannot be read ({type(error).__name__})"
    if not sha256 or recorded != sha256:
        return None, None, (f"{path} was made from another checkpoint (SHA-256 {str(recorded)[:12]}..., not "
                            f"{str(sha256)[:12]}...); write it again with scripts/export.py --int8")
    return path, data, None


def build_runtime_for_predictor(predictor, backend=None, *, cache_key=None):
    """The runtime a ``Predictor`` uses, with which one and why logged and kept as its ``description``.

    An explicitly requested backend must build (``int8`` needs a file made from this checkpoint). With none, the
    CPU runs the int8 fast path when that file is there and the CPU has int8 dot products, else float32 ONNX; a
    default that fails to build falls back to the next one (int8 -> onnx -> eager) with a warning.
    """
    requested = requested_backend(backend)
    name = resolve_backend(backend, device=predictor.device)
    params = predictor.transform_params
    example_input = torch.zeros(1, params["channels"], params["crop_size"], params["crop_size"])
    build = functools.partial(build_runtime, predictor.network, example_input=example_input, device=predictor.device,
                              cache_key=cache_key)

    def chosen(runtime, description):
        runtime.description = description
        logger.info("inference backend %s", description)
        return runtime

    if name == FAST_BACKEND:
        path, data, reason = fast_path_file(predictor.checkpoint_path, predictor.sha256)
        if path is None:
            raise BackendError(f"inference backend {FAST_BACKEND!r} was asked for, but {reason}")
        return chosen(build(FAST_BACKEND, model_path=path, model_bytes=data), f"{FAST_BACKEND}, as asked ({path})")
    why_not_fast = None
    if requested == "auto" and name == DEFAULT_BACKEND:
        supported, flag = cpu_int8_support()  # first: a CPU that cannot use the file need not read it
        path, data, why_not_fast = fast_path_file(predictor.checkpoint_path, predictor.sha256) if supported else (
            None, None, flag)
        if path is not None:
            try:
                runtime = build(FAST_BACKEND, model_path=path, model_bytes=data)
            except BackendError as error:
                logger.warning("%s; using float32 ONNX instead", error)
                why_not_fast = f"it failed to build ({error})"
            else:
                return chosen(runtime, f"{FAST_BACKEND}, the fast path ({path}; this CPU has {flag})")
    try:
        runtime = build(name)
    except BackendError as error:
        if requested != "auto" or name == "eager":
            raise
        logger.warning("%s; using the eager backend instead", error)
        return chosen(build("eager"), "eager (the default could not be built)")
    if requested != "auto":
        return chosen(runtime, f"{name}, as asked")
    if why_not_fast:
        return chosen(runtime, f"{name} (float32), not the int8 fast path: {why_not_fast}")
    return chosen(runtime, f"{name}, the default on {predictor.device}")


def build_runtime(network, backend, *, example_input, device="cpu", cache_key=None, model_path=None,
                  model_bytes=None):
    """Build (and warm up) the runtime for ``backend`` around an eval-mode network; raises ``BackendError``.

    ``model_path``, ``model_bytes``: the int8 backend's ONNX file and its content (``fast_path_file``).
    """
    builders = {
        "eager": EagerRuntime,
        "channels_last": ChannelsLastRuntime,
        "bf16": Bfloat16Runtime,
        "onnx": OnnxRuntime,
        "int8": Int8OnnxRuntime,
    }
    if backend not in builders:
        raise BackendError(f"unknown inference backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    example_input = example_input.to(device)
    try:
        if backend == "onnx":
            runtime = OnnxRuntime(network.eval(), example_input, cache_key=cache_key)
        elif backend == "int8":
            if model_bytes is None:
                raise BackendError("inference backend 'int8' needs its ONNX file (model/runtime.py: fast_path_file)")
            runtime = Int8OnnxRuntime(model_bytes, model_path)
        else:
            runtime = builders[backend](network.eval(), example_input)
        runtime(example_input)  # fail at start-up rather than on the first request
    except BackendError:
        raise
    except (RuntimeError, ValueError, TypeError, ImportError, OSError) as error:
        raise BackendError(
            f"inference backend {backend!r} could not be built: {type(error).__name__}: {str(error).splitlines()[0]}"
        ) from error
    return runtime


class Runtime:
    """What every runtime offers: ``name``, ``__call__(batch) -> (logits, activations)`` and ``prepare()``."""

    name = None
    description = None  # which backend runs and why, set by build_runtime_for_predictor

    def prepare(self):
        """Per-process set-up after a fork; torch runtimes need none."""


class EagerRuntime(Runtime):
    """Plain PyTorch, float32, contiguous (NCHW) tensors: the reference every other backend is checked against."""

    name = "eager"

    def __init__(self, network, example_input):
        self.module = FeatureNetwork(network).eval()

    @torch.inference_mode()
    def __call__(self, batch):
        return self.module(batch)


class ChannelsLastRuntime(Runtime):
    """Eager PyTorch with NHWC memory layout, which oneDNN's convolutions prefer; weights are a private copy."""

    name = "channels_last"

    def __init__(self, network, example_input):
        self.module = FeatureNetwork(copy.deepcopy(network)).eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, batch):
        logits, features = self.module(batch.contiguous(memory_format=torch.channels_last))
        return logits, features.contiguous()


class Bfloat16Runtime(Runtime):
    """Batch norm folded into float32 convolutions, then weights and activations in bfloat16, NHWC.

    Fast only on CPUs with native bfloat16 (AVX512-BF16, AMX); outputs come back as float32.
    """

    name = "bf16"

    def __init__(self, network, example_input):
        module = FeatureNetwork(fold_batch_norm(copy.deepcopy(network).eval())).eval()
        self.module = module.to(dtype=torch.bfloat16, memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, batch):
        logits, features = self.module(batch.to(dtype=torch.bfloat16, memory_format=torch.channels_last))
        return logits.float(), features.float().contiguous()


class OnnxRuntime(Runtime):
    """The network exported to ONNX (in memory, at construction) and run by ONNX Runtime's CPU provider.

    The session follows the process's torch thread count. A one-thread session has no thread pool, so one
    opened in the gunicorn master before the fork serves every one-thread worker, its weights shared; a
    thread pool does not survive ``fork``, so a worker with more threads opens its own session on first use.
    """

    name = "onnx"

    def __init__(self, network, example_input, *, cache_key=None):
        _start_onnxruntime(self.name)
        # The export takes seconds; a process that builds several Predictors of one checkpoint (tests) does it once.
        export_key = (cache_key, tuple(example_input.shape[1:])) if cache_key else None
        model_bytes = _ONNX_EXPORTS.get(export_key)
        if model_bytes is None:
            model_bytes = export_onnx(network, example_input)
            if export_key:
                _ONNX_EXPORTS[export_key] = model_bytes
        self._use(model_bytes)

    def _use(self, model_bytes):
        """Run ``model_bytes``; sessions are opened on first use."""
        self.model_bytes = model_bytes
        self._session = None
        self._session_key = None
        self._lock = threading.Lock()

    def prepare(self):
        """Open this process's session now (e.g. from gunicorn's ``post_fork``) instead of on the first request."""
        self.session()

    def session(self):
        """This process's ONNX Runtime session, opened on first use (and again after a fork)."""
        threads = torch.get_num_threads()
        key = (threads,) if threads == 1 else (threads, os.getpid())
        with self._lock:
            if self._session_key != key:
                self._session = _open_onnx_session(self.model_bytes, threads=threads)
                self._session_key = key
            return self._session

    def __call__(self, batch):
        images = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        logits, features = self.session().run(["logits", "features"], {"images": images})
        return torch.from_numpy(logits), torch.from_numpy(features)


class Int8OnnxRuntime(OnnxRuntime):
    """The int8 fast path: the quantized ONNX file written at export, run by ONNX Runtime's CPU provider.

    Nothing is exported or quantized here: it runs the file's bytes as read (once) by ``fast_path_file``, and
    sessions are opened (and shared across a fork) as for ``OnnxRuntime``.
    """

    name = "int8"

    def __init__(self, model_bytes, model_path):
        _start_onnxruntime(self.name)
        self.model_path = str(model_path)
        self._use(model_bytes)


def _start_onnxruntime(backend):
    """Import onnxruntime with its telemetry off; ``BackendError`` when it is not installed."""
    try:
        import onnxruntime
    except ImportError as error:
        raise BackendError(f"inference backend {backend!r} needs onnxruntime (pip install -r requirements.txt)") from error
    onnxruntime.disable_telemetry_events()


def export_onnx(network, example_input, path=None):
    """Export ``FeatureNetwork(network)`` to ONNX (inputs ``images``; outputs ``logits``, ``features``).

    The batch dimension is dynamic. Returns the model's bytes, and writes them to ``path`` when given.
    The network is traced as it is, not copied: the exporter keeps what it traced alive after it returns, and a
    copy would stay in the gunicorn master for good.
    """
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), _quiet_loggers(*EXPORTER_LOGGERS), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes on torch internals
        program = torch.onnx.export(
            FeatureNetwork(network.eval()),
            (example_input[:1].cpu(),),
            input_names=["images"],
            output_names=["logits", "features"],
            dynamic_shapes={"images": {0: batch}},
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
    data = program.model_proto.SerializeToString()
    if path is not None:
        _write_atomically(data, path)
    return data


def _write_atomically(data, path):
    """Write bytes to a temporary file beside ``path``, then rename it into place."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                             dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


@contextlib.contextmanager
def _quiet_loggers(*names, level=logging.WARNING):
    """Raise the level of chatty third-party loggers for the duration of a block."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(max(level, each.level))
    try:
        yield
    finally:
        for each, old_level in zip(loggers, previous):
            each.setLevel(old_level)


def _open_onnx_session(model_bytes, *, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # Busy-waiting threads would steal cores from the other gunicorn workers between requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def fold_batch_norm(network):
    """Fold every eval-mode BatchNorm2d that follows a Conv2d into it (torchvision ResNet layout), in place."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(parent, conv_name, norm_name):
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
        setattr(parent, norm_name, nn.Identity())

    fold(network, "conv1", "bn1")
    for layer in (network.layer1, network.layer2, network.layer3, network.layer4):
        for block in layer:
            index = 1
            while hasattr(block, f"conv{index}"):
                fold(block, f"conv{index}", f"bn{index}")
                index += 1
            if block.downsample is not None:
                fold(block.downsample, "0", "1")
    return network
