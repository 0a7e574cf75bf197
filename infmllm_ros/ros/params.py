"""The node's parameters: one table, :data:`PARAMETERS`, of names, defaults, descriptions, the
rule each value must meet and the session setting each one feeds. Everything else is derived
from it: the node declares every row with a descriptor and reads every one, :class:`NodeConfig`
has one field per row, :func:`validate` checks every row's rule and then the rules that tie
parameters together (:data:`COUPLED`), and :meth:`NodeConfig.session_kwargs` /
:attr:`NodeConfig.answer_settings` map rows to the session. A new parameter is one row, plus the
code that uses it.

The table is plain data so the launch test and the YAML files can be checked against it without
a ROS graph. YAML files use the usual ``/**: ros__parameters:`` layout with dotted names as
nesting (``cache.capacity`` is ``cache: {capacity: ...}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, make_dataclass
from pathlib import Path

from ..kvcache import KVCache
from ..kvcache.policies import (
    DEFAULT_SLACK,
    MEMORY_BETA,
    MEMORY_DECAY,
    MEMORY_VISION_BUDGET,
    POLICIES,
    PolicySettingError,
    make_policy,
)
from ..models.registry import PRECISIONS
from ..runtime.backends import BACKENDS
from ..runtime.generate import Sampling
from ..runtime.recall import SEEN_THRESHOLD
from ..runtime.session import (
    DEFAULT_EVIDENCE_SIGHTINGS,
    DEFAULT_FAMILIAR_INTERVAL_S,
    DEFAULT_MAX_QUESTION_TOKENS,
    DEFAULT_SAMPLING,
    DEFAULT_SENTENCE_STOP_WORDS,
    MAX_NEW_TOKENS_LIMIT,
    AnswerSettings,
)
from .images import MAX_FRAME_PIXELS

TRANSPORTS = ("raw", "compressed")
POSE_MSG_TYPES = ("odometry", "pose_stamped")


@dataclass(frozen=True)
class Range:
    """A finite number in ``[lo, hi]`` (``lo_open``/``hi_open`` exclude that end), or one of
    ``also`` (special values, explained by ``note``). Called with a value: ``""`` when it holds,
    else what the value must be."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    unit: str = ""
    note: str = ""
    also: tuple = ()

    def __call__(self, value) -> str:
        if value in self.also:
            return ""
        ok = isinstance(value, int | float) and math.isfinite(value)
        ok = ok and (value > self.lo if self.lo_open else value >= self.lo)
        ok = ok and (value < self.hi if self.hi_open else value <= self.hi)
        if ok:
            return ""
        if self.hi == math.inf:
            where = f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            where = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        unit = f" {self.unit}" if self.unit else ""
        return f"must be {where}{unit}" + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``."""

    choices: tuple

    def __call__(self, value) -> str:
        return "" if value in self.choices else f"one of {self.choices}"


@dataclass(frozen=True)
class Text:
    """Text that is not blank (``empty``: ``""`` is also taken, meaning what ``what`` says)."""

    what: str
    empty: bool = True

    def __call__(self, value) -> str:
        return "" if (self.empty and value == "") or str(value).strip() else self.what


_KEEP = object()  # Param.none_when default: no value stands for the session's own default


@dataclass(frozen=True)
class Param:
    """One parameter.

    Attributes:
        name: ROS name (dots nest in YAML). default: its value; its type is the parameter's.
        description: the descriptor's text. dynamic: can change at runtime (``ros2 param set``).
        check: the rule the value meets alone (:class:`Range`, :class:`OneOf`, :class:`Text`;
            None: any value of the type); rules across parameters are in :data:`COUPLED`.
        session: the :class:`~infmllm_ros.runtime.session.StreamSession` keyword, or
            :class:`~infmllm_ros.runtime.session.AnswerSettings` field, it feeds
            (``sampling.<field>`` for a :class:`Sampling` field; ``""``: read by the node).
        none_when: the value that passes None, the session's own default (-1, 0 or ``""``).
    """

    name: str
    default: object
    description: str
    dynamic: bool = False
    check: Callable[[object], str] | None = None
    session: str = ""
    none_when: object = _KEEP

    @property
    def attr(self) -> str:
        """The :class:`NodeConfig` field: the name with dots as underscores."""
        return self.name.replace(".", "_")


def _device(value) -> str:
    ok = value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    return "" if ok else "cpu, cuda or cuda:N"


SECONDS = "seconds"
PARAMETERS = (
    Param(
        "camera_topics",
        ["camera/front/image_raw/compressed"],
        "image topics to watch (relative names follow the node's namespace)",
    ),
    Param(
        "camera_transports",
        ["compressed"],
        "per topic: 'compressed' (sensor_msgs/CompressedImage) or 'raw' (sensor_msgs/Image); "
        "one entry applies to all topics",
    ),
    Param("camera_names", [""], "per topic: the name in the frame tag (cam=...); '' derives it from the topic"),
    Param(
        "qos_reliability",
        "best_effort",
        "camera subscription reliability: best_effort or reliable",
        check=OneOf(("best_effort", "reliable")),
    ),
    Param(
        "qos_depth",
        1,
        "camera subscription keep-last depth (1: the sampler wants the newest frame)",
        check=Range(1),
    ),
    Param(
        "max_camera_rate_hz",
        30.0,
        "camera messages read per second per camera at most (averaged over the cameras); a camera sending "
        "faster has its surplus replaced unread inside DDS (keep-last), counted as camera_<name>_unread in "
        "/diagnostics, so a flood costs no Python time (0: read every message)",
        check=Range(0, 10000, unit="messages per second", note="0: no limit"),
    ),
    Param(
        "sample_rate_hz",
        1.0,
        "frames per second ingested per camera, by header stamp (0: every frame)",
        dynamic=True,
        check=Range(0, 1000, unit="frames per second", note="0: every frame"),
    ),
    Param(
        "duplicate_threshold",
        0.0,
        "skip a frame whose 32x32 grey thumbnail differs from the last ingested one by less than "
        "this mean absolute difference in [0, 1] (0: off)",
        dynamic=True,
        check=Range(0, 1, hi_open=True),
    ),
    Param(
        "max_frame_pixels",
        MAX_FRAME_PIXELS,
        "frames with more pixels (width x height, read from the header before decoding) are refused as too_large",
        dynamic=True,
        check=Range(64, 2**31 - 1, unit="pixels"),
    ),
    Param(
        "max_stamp_skew_s",
        10.0,
        "frames stamped more than this many seconds ahead of the node clock are refused as bad_stamp "
        "(never become the stream's newest time; 0: no check)",
        dynamic=True,
        check=Range(0, unit=SECONDS, note="0: no check"),
    ),
    Param(
        "clock_reset_s",
        2.0,
        "a camera whose stamp goes back by more than this many seconds has restarted its clock (bag "
        "loop, simulator restart): its frame order restarts and memory is kept; by less, the frame is late",
        dynamic=True,
        check=Range(0, lo_open=True, unit=SECONDS),
    ),
    Param(
        "pose_topic",
        "",
        "the robot's pose (pose_msg_type); every stored frame keeps the pose nearest its stamp "
        "and answers say where ('near (12.3, -4.1) in map'); '' for none",
        check=Text("a topic name, or '' for none"),
    ),
    Param(
        "pose_msg_type",
        "odometry",
        "the pose topic's type: odometry (nav_msgs/msg/Odometry) or pose_stamped (geometry_msgs/msg/PoseStamped)",
        check=OneOf(POSE_MSG_TYPES),
    ),
    Param(
        "pose_tolerance_s",
        0.2,
        "largest |frame stamp - pose stamp| (seconds) for a frame to take that pose; a "
        "frame with none that near is stored without a position",
        check=Range(0, 60, lo_open=True, unit=SECONDS),
    ),
    Param(
        "near_radius_m",
        5.0,
        "radius (metres) of 'What did you see near (x, y)?'",
        dynamic=True,
        check=Range(0, lo_open=True, unit="metres"),
        session="near_radius_m",
    ),
    Param(
        "novelty_threshold",
        -1.0,
        "change of a frame's summary from the camera's recent scene, in [0, 1], at which it is stored "
        "with vision tokens; below it, as 'Nothing new.' (0: every frame; -1: the model family's "
        "default: 0.6 total variation of class probabilities for the embedded model; 0.1 cosine distance of "
        "the mean vision token for Qwen2/2.5/3-VL, SmolVLM2 and InternVL3, not calibrated on real weights)",
        check=Range(0, 1, also=(-1.0,), note="or -1 for the model family's default"),
        session="novelty_threshold",
        none_when=-1.0,
    ),
    Param(
        "familiar_interval_s",
        DEFAULT_FAMILIAR_INTERVAL_S,
        "seconds between stored 'Nothing new.' frames of a camera; familiar frames in between only "
        "update the scene (0: store every frame)",
        check=Range(0, unit=SECONDS),
        session="familiar_interval_s",
    ),
    Param(
        "model",
        "smollm2-135m",
        "model preset (smollm2-135m), path to a LLaMA-family GGUF file, or a "
        "Hugging Face checkpoint directory of a supported VLM (Qwen2.5-VL, Qwen2-VL, Qwen3-VL, SmolVLM2, "
        "InternVL3 -hf)",
    ),
    Param(
        "precision",
        "fp32",
        "weight dtype of a Hugging Face model: fp32, fp16 or bf16 (GGUF models run fp32), "
        "or int8 (weight-only int8 linears, CPU)",
        check=OneOf(PRECISIONS),
    ),
    Param(
        "backend",
        "torch",
        "inference backend: torch, compiled (torch.compile of the decode step, a CUDA graph "
        "on a GPU: answers decode about twice as fast on a CPU after a compile at start, 2-4 minutes the first "
        "time, seconds once Inductor's cache is warm), onnxruntime (CPU, every family: vision, embedding and "
        "decoder-step ONNX engines, exported on first start or by infmllm-build-engines --backend onnxruntime) "
        "or tensorrt (CUDA; engines from infmllm-build-engines --backend tensorrt on the device)",
        check=OneOf(tuple(BACKENDS)),
        session="backend",
    ),
    Param(
        "engine_dir",
        "engines",
        "folder of a model's exported engines (vision, embedding, decoder step) / TensorRT engines and their manifest",
        check=Text("a folder path", empty=False),
        session="engine_dir",
    ),
    Param("device", "cpu", "torch device: cpu, cuda or cuda:N", check=_device),
    Param("cache.capacity", 1024, "KV-cache slots (tokens) kept for the stream", session="capacity"),
    Param(
        "cache.sinks",
        0,
        "protected leading tokens of the system prompt (0: all of them)",
        session="sinks",
        none_when=0,
    ),
    Param("cache.recent", 256, "protected newest tokens", session="recent"),
    Param("cache.policy", "inf_mllm", f"eviction policy: {', '.join(sorted(POLICIES))}", session="policy"),
    Param("cache.beta", MEMORY_BETA, "inf_mllm attention bias per slot (Inf-MLLM, attention bias)", session="beta"),
    Param(
        "cache.decay",
        MEMORY_DECAY,
        "inf_mllm score carry decay per chunk (0: retrieval window only)",
        session="decay",
    ),
    Param(
        "cache.vision_budget",
        -1,
        "vision tokens per (layer, KV head) row kept ahead of other saddles, "
        f"h2o and inf_mllm only (-1: {MEMORY_VISION_BUDGET} for those, 0 for the others)",
        check=Range(-1, note="-1: the policy's default"),
        session="vision_budget",
        none_when=-1,
    ),
    Param(
        "cache.slack",
        DEFAULT_SLACK,
        "lazy eviction: tokens appended past cache.capacity before an eviction "
        "runs; one eviction then makes room for this many (0: evict on every chunk that overflows)",
        session="slack",
    ),
    Param(
        "cache.max_chunk",
        0,
        "largest prefill chunk in tokens (0: 64, or the model's largest frame: its vision tokens + 48)",
        check=Range(8, also=(0,), note="or 0 for the session's default"),
        session="max_chunk",
        none_when=0,
    ),
    Param(
        "max_new_tokens",
        48,
        "default answer length limit in tokens (Ask.max_new_tokens = 0)",
        dynamic=True,
        check=Range(1, MAX_NEW_TOKENS_LIMIT, unit="tokens"),
    ),
    Param(
        "max_question_tokens",
        DEFAULT_MAX_QUESTION_TOKENS,
        "longest question taken, in tokens; a longer one is refused at once",
        dynamic=True,
        check=Range(1, 4096, unit="tokens"),
        session="max_question_tokens",
    ),
    Param(
        "answer.timeout_s",
        60.0,
        "seconds an answer may take; then decoding stops and the partial answer is returned with "
        "stopped='deadline' (0: no deadline)",
        dynamic=True,
        check=Range(0, unit=SECONDS, note="0: no deadline"),
    ),
    Param(
        "log_full_text",
        False,
        "log questions and answers in full (default: the first 80 characters)",
        dynamic=True,
    ),
    Param(
        "answer.repetition_penalty",
        DEFAULT_SAMPLING.repetition_penalty,
        "transformers' repetition_penalty over the answer's own tokens (> 0; 1.0: off)",
        dynamic=True,
        check=Range(0, lo_open=True, note="1.0: off"),
        session="sampling.repetition_penalty",
    ),
    Param(
        "answer.no_repeat_ngram_size",
        DEFAULT_SAMPLING.no_repeat_ngram_size,
        "no n-gram of this many tokens twice in an answer (0: off)",
        dynamic=True,
        check=Range(0, 64, unit="tokens", note="0: off"),
        session="sampling.no_repeat_ngram_size",
    ),
    Param(
        "answer.sentence_stop_words",
        DEFAULT_SENTENCE_STOP_WORDS,
        "questions of at most this many words are answered with one sentence (0: off)",
        dynamic=True,
        check=Range(0, unit="words", note="0: off"),
        session="sentence_stop_words",
    ),
    Param(
        "answer.temperature",
        0.0,
        "sampling temperature (0: greedy, the default)",
        dynamic=True,
        check=Range(0, 10, note="0: greedy"),
        session="sampling.temperature",
    ),
    Param(
        "answer.top_p",
        1.0,
        "nucleus sampling mass in (0, 1] (with temperature > 0)",
        dynamic=True,
        check=Range(0, 1, lo_open=True),
        session="sampling.top_p",
    ),
    Param(
        "answer.seed",
        -1,
        "sampling seed (-1: a fresh seed per answer)",
        dynamic=True,
        check=Range(-1, note="-1: a fresh seed per answer"),
        session="sampling.seed",
        none_when=-1,
    ),
    Param(
        "answer.evidence_sightings",
        DEFAULT_EVIDENCE_SIGHTINGS,
        "sightings rendered into the answer prompt as a memory line (0: none)",
        dynamic=True,
        check=Range(0, 10),
        session="evidence_sightings",
    ),
    Param(
        "answer.seen_threshold",
        SEEN_THRESHOLD,
        "best-sighting score at which an object counts as seen (bench/results/seen_calibration.*)",
        dynamic=True,
        check=Range(),
        session="seen_threshold",
    ),
    Param(
        "system_prompt",
        "",
        "system prompt; its tokens are the stream's sinks ('': the model family's answer template's, "
        "runtime/answer.py)",
        check=Text("'' (the family's) or text"),
        session="system_prompt",
        none_when="",
    ),
    Param(
        "diagnostics_period_s",
        1.0,
        "seconds between /diagnostics messages",
        check=Range(0, 3600, lo_open=True, unit=SECONDS),
    ),
    Param(
        "autostart",
        True,
        "configure and activate at start (false: stay unconfigured until a lifecycle manager drives the node)",
    ),
    Param(
        "memory_image_period_s",
        5.0,
        "seconds between ~/memory_image mosaics of the frames in the KV cache (0: off)",
        check=Range(0, unit=SECONDS, note="0: off"),
    ),
    Param(
        "memory_file",
        "",
        "memory file (safetensors): loaded at start when it exists, saved at shutdown and "
        "every memory_save_period_s; '' keeps memory in RAM only",
    ),
    Param(
        "memory_dir",
        "",
        "folder of memory files: memory_file and the names ~/save_memory and ~/load_memory take "
        "must resolve inside it (symlinks followed); nothing is written or created outside it; created at "
        "configure if missing ('': memory_file's folder; with neither set the services refuse)",
        check=Text("a folder path, or '' for memory_file's"),
    ),
    Param(
        "memory_save_period_s",
        0.0,
        "seconds between periodic saves of memory_file (0: at shutdown only)",
        check=Range(0, unit=SECONDS, note="0: at shutdown only"),
    ),
)


def _cameras(v: dict) -> tuple[str, str] | None:
    topics, transports, names = list(v["camera_topics"]), list(v["camera_transports"]), list(v["camera_names"])
    if not topics or not all(isinstance(t, str) and t.strip() for t in topics):
        return "camera_topics", "give at least one non-empty topic"
    if len(set(topics)) != len(topics):
        return "camera_topics", "topics must be distinct"
    if len(transports) not in (1, len(topics)) or not all(t in TRANSPORTS for t in transports):
        return "camera_transports", f"one entry or one per topic, each in {TRANSPORTS}"
    if len(names) > len(topics):
        return "camera_names", "at most one name per topic"
    if not all(" " not in n and ">" not in n for n in names):
        return "camera_names", "names cannot hold spaces or '>'"
    return None


def _device_fits(v: dict) -> tuple[str, str] | None:
    if v["precision"] == "int8" and v["device"] != "cpu":
        return "device", "cpu with precision int8"
    if v["backend"] == "tensorrt" and not v["device"].startswith("cuda"):
        return "device", "cuda with backend tensorrt"
    if v["backend"] == "onnxruntime" and v["device"] != "cpu":
        return "device", "cpu with backend onnxruntime"
    return None


def _cache_rules(v: dict) -> tuple[str, str] | None:
    """The cache's own rules (kvcache/): the policy, its counts, beta, decay, the vision budget,
    the capacity and the slack. The session checks the capacity again once the system prompt's
    length (sinks 0) and the chunk are known."""
    try:
        policy = make_policy(
            v["cache.policy"],
            sinks=v["cache.sinks"],
            recent=v["cache.recent"],
            vision_budget=max(0, v["cache.vision_budget"]),
            beta=v["cache.beta"],
            decay=v["cache.decay"],
        )
        KVCache.check_settings(v["cache.capacity"], max(1, v["cache.max_chunk"]), v["cache.slack"], policy)
    except PolicySettingError as exc:
        return f"cache.{exc.setting}", str(exc)
    return None


def _saves_need_a_file(v: dict) -> tuple[str, str] | None:
    if v["memory_save_period_s"] != 0 and not v["memory_file"].strip():
        return "memory_save_period_s", "needs memory_file"
    return None


#: Rules across parameters, run after every row's own rule: each returns ``(parameter, what it
#: must be)`` for the first problem it finds, or None.
COUPLED: tuple[Callable[[dict], tuple[str, str] | None], ...] = (
    _cameras,
    _device_fits,
    _cache_rules,
    _saves_need_a_file,
)


class _Derived:
    """What :class:`NodeConfig` derives from its fields."""

    def _to_session(self, p: Param):
        value = getattr(self, p.attr)
        return None if p.none_when is not _KEEP and value == p.none_when else value

    @property
    def cameras(self) -> list[tuple[str, str, bool]]:
        """``(topic, camera name, compressed)`` per subscription."""
        out = []
        for i, topic in enumerate(self.camera_topics):
            transport = self.camera_transports[i if len(self.camera_transports) > 1 else 0]
            name = self.camera_names[i] if len(self.camera_names) > i else ""
            out.append((topic, name or camera_name_from_topic(topic), transport == "compressed"))
        return out

    @property
    def memory_folder(self) -> Path | None:
        """The folder memory files live in: ``memory_dir``, else ``memory_file``'s folder, else None."""
        if self.memory_dir:
            return Path(self.memory_dir).expanduser()
        return Path(self.memory_file).expanduser().absolute().parent if self.memory_file else None

    @property
    def sampling(self) -> Sampling:
        """The answers' decoding: the rows whose ``session`` is ``sampling.<field>``."""
        return Sampling(
            **{
                p.session.removeprefix("sampling."): self._to_session(p)
                for p in PARAMETERS
                if p.session.startswith("sampling.")
            }
        )

    @property
    def answer_settings(self) -> AnswerSettings:
        """How answers are shaped (set at start, and replaced whole by ``ros2 param set``)."""
        named = {f.name for f in fields(AnswerSettings)}
        return AnswerSettings(
            sampling=self.sampling, **{p.session: self._to_session(p) for p in PARAMETERS if p.session in named}
        )

    def session_kwargs(self) -> dict:
        """Keyword arguments for :func:`~infmllm_ros.runtime.session.open_session`: every row with
        a ``session`` keyword, answer settings included; ``track_positions`` when a pose topic is set."""
        answer = self.answer_settings
        kwargs = {p.session: self._to_session(p) for p in PARAMETERS if p.session and "." not in p.session}
        kwargs.update({f.name: getattr(answer, f.name) for f in fields(AnswerSettings)})
        return dict(kwargs, track_positions=bool(self.pose_topic))


def _field_type(default: object) -> type:
    return tuple if isinstance(default, list) else type(default)


#: Validated parameter values, one frozen field per :data:`PARAMETERS` row (dots as underscores,
#: lists as tuples), built by :func:`validate`.
NodeConfig = make_dataclass(
    "NodeConfig",
    [(p.attr, _field_type(p.default)) for p in PARAMETERS],
    bases=(_Derived,),
    frozen=True,
    namespace={"__module__": __name__, "__doc__": "Validated parameter values: one field per parameter."},
)


def flatten_parameters(doc: dict) -> dict:
    """A ROS parameter YAML document (``{"/**": {"ros__parameters": {...}}}``) -> dotted names.

    Raises:
        ValueError: the document has no ``/**: ros__parameters`` section.
    """
    try:
        tree = doc["/**"]["ros__parameters"]
    except (KeyError, TypeError):
        raise ValueError("parameter file needs a '/**: ros__parameters:' section") from None
    flat = {}

    def walk(d: dict, prefix: str) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(tree, "")
    return flat


def camera_name_from_topic(topic: str) -> str:
    """``/robot/camera/front/image_raw/compressed`` -> ``front``: the last path element that is not
    a transport or image suffix, else the last element."""
    skip = {"image_raw", "image", "image_color", "image_rect", "image_rect_color", "compressed", "camera"}
    parts = [p for p in topic.strip("/").split("/") if p]
    for part in reversed(parts):
        if part not in skip:
            return part
    return parts[-1] if parts else "camera"


def type_problem(p: Param, value) -> str:
    """``""`` when ``value`` has the ROS type of ``p``'s default, else what it must be. An integer
    is taken for a double (``10`` for ``10.0``, as YAML writes it); a bool is never a number."""
    default = p.default
    if isinstance(default, list):
        ok = isinstance(value, list | tuple) and all(isinstance(x, str) for x in value)
        return "" if ok else "must be a list of strings"
    if isinstance(default, bool):
        return "" if isinstance(value, bool) else "must be true or false"
    if isinstance(default, float):
        ok, need = isinstance(value, int | float), "must be a number (a double)"
    elif isinstance(default, int):
        ok, need = isinstance(value, int), "must be an integer"
    else:
        ok, need = isinstance(value, str), "must be a string"
    return "" if ok and not isinstance(value, bool) else need


def _as_field(p: Param, value):
    """A checked value as its :class:`NodeConfig` field holds it (lists as tuples, doubles as float)."""
    if isinstance(p.default, list):
        return tuple(value)
    return float(value) if isinstance(p.default, float) else value


def validate(values: dict) -> NodeConfig:
    """Check raw parameter values (ROS names -> values; a missing name takes its default): each
    row's type (:func:`type_problem`) and rule, then :data:`COUPLED`. Returns a :class:`NodeConfig`.

    Raises:
        ValueError: the first problem found, naming the parameter and what it must be.
    """
    v = {p.name: values.get(p.name, p.default) for p in PARAMETERS}

    def refuse(name: str, problem: str):
        raise ValueError(f"parameter {name}={v[name]!r}: {problem}")

    for p in PARAMETERS:
        if problem := type_problem(p, v[p.name]) or (p.check(v[p.name]) if p.check is not None else ""):
            refuse(p.name, problem)
    for rule in COUPLED:
        if found := rule(v):
            refuse(*found)
    return NodeConfig(**{p.attr: _as_field(p, v[p.name]) for p in PARAMETERS})
