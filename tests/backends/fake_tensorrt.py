"""A stand-in for the `tensorrt` module (TensorRT 10 Python API), for tests without TensorRT.

It implements the names `qcompile.backends.tensorrt.engine` calls, with the enum values of the real
bindings, records every call, and checks what TensorRT itself would refuse: a dynamic input
without an optimization profile (or with a profile of the wrong rank or fixed sizes), and
precision flags on a strongly typed network. Knobs: `parser_errors`, `build_errors`,
`engine_io`. Install it with `monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())`.
"""

from __future__ import annotations

import enum
import types

import onnx


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):  # kFP16 = 0, kINT8 = 1, kFP8 = 15, kBF16 = 17, kFP4 = 26
    FP16 = 0
    INT8 = 1
    FP8 = 15
    BF16 = 17
    FP4 = 26


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass


class IProgressMonitor:
    def __init__(self) -> None:
        pass


class ParserError:
    def __init__(self, desc: str, node: int = -1, node_name: str = "", node_operator: str = ""):
        self._desc, self._node, self._name, self._operator = desc, node, node_name, node_operator

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._operator

    def code(self) -> int:
        return 8  # UNSUPPORTED_NODE


class FakeTensorRT(types.ModuleType):
    """The fake module; `calls` lists (name, args) in order."""

    __version__ = "10.8.0.43"
    ILogger = ILogger
    IProgressMonitor = IProgressMonitor
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    BuilderFlag = BuilderFlag
    MemoryPoolType = MemoryPoolType
    TensorIOMode = TensorIOMode
    DataType = DataType

    def __init__(self) -> None:
        super().__init__("tensorrt")
        self.calls: list[tuple] = []
        self.parser_errors: list[ParserError] = []
        self.build_errors: list[str] = []
        #: (name, mode, dtype, shape) of the engine's IO; -1 in an output takes input 0's size.
        self.engine_io = [("input", TensorIOMode.INPUT, DataType.FLOAT, (-1, 64)),
                          ("output", TensorIOMode.OUTPUT, DataType.FLOAT, (-1, 32))]
        fake = self

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("Builder", logger))
                self.logger = logger

            def create_network(self, flags=0):
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                fake.calls.append(("create_builder_config",))
                return BuilderConfig()

            def create_optimization_profile(self):
                fake.calls.append(("create_optimization_profile",))
                return OptimizationProfile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network", network, config))
                errors = fake.build_errors + _refusals(network, config)
                monitor = config.progress_monitor
                if monitor is not None:
                    monitor.phase_start("Building engine", None, 2)
                    monitor.phase_start("Tactic selection", "Building engine", 3)
                    for step in range(3):
                        monitor.step_complete("Tactic selection", step)
                    monitor.phase_finish("Tactic selection")
                    monitor.step_complete("Building engine", 0)
                    monitor.step_complete("Building engine", 1)
                    monitor.phase_finish("Building engine")
                for message in errors:
                    self.logger.log(Severity.ERROR, message)
                return None if errors else b"fake-engine"

        class Network:
            def __init__(self, flags):
                self.flags = flags
                self.inputs: dict[str, tuple[int, ...]] = {}

            @property
            def num_inputs(self):
                return len(self.inputs)

        class OnnxParser:
            def __init__(self, network, logger):
                fake.calls.append(("OnnxParser", network, logger))
                self.network = network
                self.errors: list[ParserError] = []

            def parse_from_file(self, path):
                fake.calls.append(("parse_from_file", path))
                model = onnx.load(path, load_external_data=False)
                initializers = {i.name for i in model.graph.initializer}
                for value in model.graph.input:
                    if value.name not in initializers:
                        dims = value.type.tensor_type.shape.dim
                        self.network.inputs[value.name] = tuple(
                            d.dim_value if d.HasField("dim_value") else -1 for d in dims)
                self.errors = list(fake.parser_errors)
                return not self.errors

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, index):
                return self.errors[index]

        class OptimizationProfile:
            def __init__(self):
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, name, min, opt, max):  # noqa: A002 (TensorRT's keyword names)
                fake.calls.append(("set_shape", name, tuple(min), tuple(opt), tuple(max)))
                self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        class TimingCache:
            def __init__(self, data: bytes):
                self.data = data

            def serialize(self):
                return b"cache:" + self.data

        class BuilderConfig:
            def __init__(self):
                self.flags: set[BuilderFlag] = set()
                self.pool_limits: dict[MemoryPoolType, int] = {}
                self.profiles: list[OptimizationProfile] = []
                self.timing_cache = None
                self.progress_monitor = None

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))
                self.flags.add(flag)

            def set_memory_pool_limit(self, pool, pool_size):
                fake.calls.append(("set_memory_pool_limit", pool, pool_size))
                self.pool_limits[pool] = pool_size

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile", profile))
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, serialized_timing_cache):
                fake.calls.append(("create_timing_cache", bytes(serialized_timing_cache)))
                return TimingCache(bytes(serialized_timing_cache))

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", cache, ignore_mismatch))
                self.timing_cache = cache
                return True

            def get_timing_cache(self):
                return self.timing_cache

        class Runtime:
            def __init__(self, logger):
                fake.calls.append(("Runtime", logger))

            def deserialize_cuda_engine(self, serialized_engine):
                fake.calls.append(("deserialize_cuda_engine", bytes(serialized_engine)))
                return Engine() if serialized_engine == b"fake-engine" else None

        class Engine:
            num_io_tensors = property(lambda self: len(fake.engine_io))

            def get_tensor_name(self, index):
                return fake.engine_io[index][0]

            def _io(self, name):
                return next(io for io in fake.engine_io if io[0] == name)

            def get_tensor_mode(self, name):
                return self._io(name)[1]

            def get_tensor_dtype(self, name):
                return self._io(name)[2]

            def create_execution_context(self):
                fake.calls.append(("create_execution_context",))
                return ExecutionContext(self)

        class ExecutionContext:
            def __init__(self, engine):
                self.engine = engine
                self.input_shapes: dict[str, tuple[int, ...]] = {}
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name, shape):
                fake.calls.append(("set_input_shape", name, tuple(shape)))
                self.input_shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                if name in self.input_shapes:
                    return self.input_shapes[name]
                first = next(iter(self.input_shapes.values()))
                return tuple(first[0] if d == -1 else d for d in self.engine._io(name)[3])

            def set_tensor_address(self, name, memory):
                fake.calls.append(("set_tensor_address", name, memory))
                self.addresses[name] = memory
                return True

            def execute_async_v3(self, stream_handle):
                fake.calls.append(("execute_async_v3", stream_handle))
                return True

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    def called(self, name: str) -> list[tuple]:
        """The argument tuples of every call to `name`."""
        return [call[1:] for call in self.calls if call[0] == name]


def _refusals(network, config) -> list[str]:
    """What TensorRT 10 refuses at build time, as it would log it."""
    errors = []
    strongly_typed = network.flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    precision_flags = config.flags & {BuilderFlag.FP16, BuilderFlag.BF16, BuilderFlag.INT8,
                                      BuilderFlag.FP8, BuilderFlag.FP4}
    if strongly_typed and precision_flags:
        errors.append(f"IBuilder::buildSerializedNetwork: Error Code 3: API Usage Error "
                      f"(precision flags {sorted(f.name for f in precision_flags)} are not "
                      "allowed with a strongly typed network)")
    profile = {}
    for p in config.profiles:
        profile.update(p.shapes)
    for name, dims in network.inputs.items():
        if -1 not in dims:
            continue
        if name not in profile:
            errors.append(f"IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error "
                          f"(Network has dynamic or shape inputs, but no optimization profile "
                          f"has been defined for input {name}.)")
            continue
        for shape in profile[name]:
            if len(shape) != len(dims) or any(d != -1 and s != d for s, d in zip(shape, dims)):
                errors.append(f"Error Code 4: profile shape {shape} does not match input {name} {dims}")
    return errors
