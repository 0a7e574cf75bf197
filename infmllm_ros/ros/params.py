"""The node's parameters: one table of names, defaults and descriptions, and their validation.

The table is plain data so the launch test and the YAML files can be checked against it without
a ROS graph; :mod:`infmllm_ros.ros.node` declares every entry with a descriptor and reads every
one. YAML files use the usual ``/**: ros__parameters:`` layout with dotted names as nesting
(``cache.capacity`` is ``cache: {capacity: ...}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
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
)
from .images import MAX_FRAME_PIXELS

TRANSPORTS = ("raw", "compressed")
POSE_MSG_TYPES = ("odometry", "pose_stamped")


@dataclass(frozen=True)
class Param:
    """One parameter: ROS name, default (its type is the parameter's type), description,
    whether it can change at runtime (``ros2 param set``)."""

    name: str
    default: object
    description: str
    dynamic: bool = False


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
    Param("qos_reliability", "best_effort", "camera subscription reliability: best_effort or reliable"),
    Param("qos_depth", 1, "camera subscription keep-last depth (1: the sampler wants the newest frame)"),
    Param(
        "max_camera_rate_hz",
        30.0,
        "camera messages read per second per camera at most (averaged over the cameras); a camera sending "
        "faster has its surplus replaced unread inside DDS (keep-last), counted as camera_<name>_unread in "
        "/diagnostics, so a flood costs no Python time (0: read every message)",
    ),
    Param(
        "sample_rate_hz", 1.0, "frames per second ingested per camera, by header stamp (0: every frame)", dynamic=True
    ),
    Param(
        "duplicate_threshold",
        0.0,
        "skip a frame whose 32x32 grey thumbnail differs from the last ingested one by less than "
        "this mean absolute difference in [0, 1] (0: off)",
        dynamic=True,
    ),
    Param(
        "max_frame_pixels",
        MAX_FRAME_PIXELS,
        "frames with more pixels (width x height, read from the header before decoding) are refused as too_large",
        dynamic=True,
    ),
    Param(
        "max_stamp_skew_s",
        10.0,
        "frames stamped more than this many seconds ahead of the node clock are refused as bad_stamp "
        "(never become the stream's newest time; 0: no check)",
        dynamic=True,
    ),
    Param(
        "clock_reset_s",
        2.0,
        "a camera whose stamp goes back by more than this many seconds has restarted its clock (bag "
        "loop, simulator restart): its frame order restarts and memory is kept; by less, the frame is late",
        dynamic=True,
    ),
    Param(
        "pose_topic",
        "",
        "the robot's pose (pose_msg_type); every stored frame keeps the pose nearest its stamp "
        "and answers say where ('near (12.3, -4.1) in map'); '' for none",
    ),
    Param(
        "pose_msg_type",
        "odometry",
        "the pose topic's type: odometry (nav_msgs/msg/Odometry) or pose_stamped (geometry_msgs/msg/PoseStamped)",
    ),
    Param(
        "pose_tolerance_s",
        0.2,
        "largest |frame stamp - pose stamp| (seconds) for a frame to take that pose; a "
        "frame with none that near is stored without a position",
    ),
    Param("near_radius_m", 5.0, "radius (metres) of 'What did you see near (x, y)?'", dynamic=True),
    Param(
        "novelty_threshold",
        -1.0,
        "change of a frame's summary from the camera's recent scene, in [0, 1], at which it is stored "
        "with vision tokens; below it, as 'Nothing new.' (0: every frame; -1: the model family's "
        "default: 0.6 total variation of class probabilities for the embedded model; 0.1 cosine distance of "
        "the mean vision token for Qwen2/2.5/3-VL, SmolVLM2 and InternVL3, not calibrated on real weights)",
    ),
    Param(
        "familiar_interval_s",
        DEFAULT_FAMILIAR_INTERVAL_S,
        "seconds between stored 'Nothing new.' frames of a camera; familiar frames in between only "
        "update the scene (0: store every frame)",
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
    ),
    Param(
        "backend",
        "torch",
        "inference backend: torch, compiled (torch.compile of the decode step, a CUDA graph "
        "on a GPU: answers decode about twice as fast on a CPU after a compile at start, 2-4 minutes the first "
        "time, seconds once Inductor's cache is warm), onnxruntime (CPU, every family: vision, embedding and "
        "decoder-step ONNX engines, exported on first start or by infmllm-build-engines --backend onnxruntime) "
        "or tensorrt (CUDA; engines from infmllm-build-engines --backend tensorrt on the device)",
    ),
    Param(
        "engine_dir",
        "engines",
        "folder of a model's exported engines (vision, embedding, decoder step) / TensorRT engines and their manifest",
    ),
    Param("device", "cpu", "torch device: cpu, cuda or cuda:N"),
    Param("cache.capacity", 1024, "KV-cache slots (tokens) kept for the stream"),
    Param("cache.sinks", 0, "protected leading tokens of the system prompt (0: all of them)"),
    Param("cache.recent", 256, "protected newest tokens"),
    Param("cache.policy", "inf_mllm", f"eviction policy: {', '.join(sorted(POLICIES))}"),
    Param("cache.beta", MEMORY_BETA, "inf_mllm attention bias per slot (Inf-MLLM, attention bias)"),
    Param("cache.decay", MEMORY_DECAY, "inf_mllm score carry decay per chunk (0: retrieval window only)"),
    Param(
        "cache.vision_budget",
        -1,
        "vision tokens per (layer, KV head) row kept ahead of other saddles, "
        f"h2o and inf_mllm only (-1: {MEMORY_VISION_BUDGET} for those, 0 for the others)",
    ),
    Param(
        "cache.slack",
        DEFAULT_SLACK,
        "lazy eviction: tokens appended past cache.capacity before an eviction "
        "runs; one eviction then makes room for this many (0: evict on every chunk that overflows)",
    ),
    Param(
        "cache.max_chunk",
        0,
        "largest prefill chunk in tokens (0: 64, or the model's largest frame: its vision tokens + 48)",
    ),
    Param("max_new_tokens", 48, "default answer length limit in tokens (Ask.max_new_tokens = 0)", dynamic=True),
    Param(
        "max_question_tokens",
        DEFAULT_MAX_QUESTION_TOKENS,
        "longest question taken, in tokens; a longer one is refused at once",
        dynamic=True,
    ),
    Param(
        "answer.timeout_s",
        60.0,
        "seconds an answer may take; then decoding stops and the partial answer is returned with "
        "stopped='deadline' (0: no deadline)",
        dynamic=True,
    ),
    Param("log_full_text", False, "log questions and answers in full (default: the first 80 characters)", dynamic=True),
    Param(
        "answer.repetition_penalty",
        DEFAULT_SAMPLING.repetition_penalty,
        "transformers' repetition_penalty over the answer's own tokens (> 0; 1.0: off)",
        dynamic=True,
    ),
    Param(
        "answer.no_repeat_ngram_size",
        DEFAULT_SAMPLING.no_repeat_ngram_size,
        "no n-gram of this many tokens twice in an answer (0: off)",
        dynamic=True,
    ),
    Param(
        "answer.sentence_stop_words",
        DEFAULT_SENTENCE_STOP_WORDS,
        "questions of at most this many words are answered with one sentence (0: off)",
        dynamic=True,
    ),
    Param("answer.temperature", 0.0, "sampling temperature (0: greedy, the default)", dynamic=True),
    Param("answer.top_p", 1.0, "nucleus sampling mass in (0, 1] (with temperature > 0)", dynamic=True),
    Param("answer.seed", -1, "sampling seed (-1: a fresh seed per answer)", dynamic=True),
    Param(
        "answer.evidence_sightings",
        DEFAULT_EVIDENCE_SIGHTINGS,
        "sightings rendered into the answer prompt as a memory line (0: none)",
        dynamic=True,
    ),
    Param(
        "answer.seen_threshold",
        SEEN_THRESHOLD,
        "best-sighting score at which an object counts as seen (bench/results/seen_calibration.*)",
        dynamic=True,
    ),
    Param(
        "system_prompt",
        "",
        "system prompt; its tokens are the stream's sinks ('': the model family's answer "
        "template's, runtime/answer.py)",
    ),
    Param("diagnostics_period_s", 1.0, "seconds between /diagnostics messages"),
    Param(
        "autostart",
        True,
        "configure and activate at start (false: stay unconfigured until a lifecycle manager drives the node)",
    ),
    Param(
        "memory_image_period_s", 5.0, "seconds between ~/memory_image mosaics of the frames in the KV cache (0: off)"
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
    ),
    Param("memory_save_period_s", 0.0, "seconds between periodic saves of memory_file (0: at shutdown only)"),
)


@dataclass(frozen=True)
class NodeConfig:
    """Validated parameter values (same names, dots as underscores)."""

    camera_topics: tuple
    camera_transports: tuple
    camera_names: tuple
    qos_reliability: str
    qos_depth: int
    max_camera_rate_hz: float
    sample_rate_hz: float
    duplicate_threshold: float
    max_frame_pixels: int
    max_stamp_skew_s: float
    clock_reset_s: float
    pose_topic: str
    pose_msg_type: str
    pose_tolerance_s: float
    near_radius_m: float
    novelty_threshold: float
    familiar_interval_s: float
    model: str
    precision: str
    backend: str
    engine_dir: str
    device: str
    cache_capacity: int
    cache_sinks: int
    cache_recent: int
    cache_policy: str
    cache_beta: float
    cache_decay: float
    cache_vision_budget: int
    cache_slack: int
    cache_max_chunk: int
    max_new_tokens: int
    max_question_tokens: int
    answer_timeout_s: float
    log_full_text: bool
    answer_repetition_penalty: float
    answer_no_repeat_ngram_size: int
    answer_sentence_stop_words: int
    answer_temperature: float
    answer_top_p: float
    answer_seed: int
    answer_evidence_sightings: int
    answer_seen_threshold: float
    system_prompt: str
    diagnostics_period_s: float
    autostart: bool
    memory_image_period_s: float
    memory_file: str
    memory_dir: str
    memory_save_period_s: float

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
        """The answers' decoding (validated by :func:`validate`)."""
        return Sampling(
            self.answer_repetition_penalty,
            self.answer_no_repeat_ngram_size,
            self.answer_temperature,
            self.answer_top_p,
            None if self.answer_seed < 0 else self.answer_seed,
        )

    def answer_kwargs(self) -> dict:
        """The session attributes that shape answers (set at start and by ``ros2 param set``)."""
        return dict(
            sampling=self.sampling,
            sentence_stop_words=self.answer_sentence_stop_words,
            evidence_sightings=self.answer_evidence_sightings,
            seen_threshold=self.answer_seen_threshold,
            max_question_tokens=self.max_question_tokens,
            near_radius_m=self.near_radius_m,
        )

    def session_kwargs(self) -> dict:
        """Keyword arguments for :func:`~infmllm_ros.runtime.session.open_session`."""
        return dict(
            backend=self.backend,
            engine_dir=self.engine_dir,
            capacity=self.cache_capacity,
            policy=self.cache_policy,
            recent=self.cache_recent,
            beta=self.cache_beta,
            decay=self.cache_decay,
            max_chunk=self.cache_max_chunk or None,
            slack=self.cache_slack,
            system_prompt=self.system_prompt or None,
            sinks=self.cache_sinks or None,
            novelty_threshold=None if self.novelty_threshold < 0 else self.novelty_threshold,
            familiar_interval_s=self.familiar_interval_s,
            vision_budget=None if self.cache_vision_budget < 0 else self.cache_vision_budget,
            track_positions=bool(self.pose_topic),
            **self.answer_kwargs(),
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


def validate(values: dict) -> NodeConfig:
    """Check raw parameter values (ROS names -> values) and build a :class:`NodeConfig`.

    Raises:
        ValueError: the first problem found, naming the parameter and the accepted values.
    """
    v = {p.name: values.get(p.name, p.default) for p in PARAMETERS}

    def need(ok: bool, name: str, what: str):
        if not ok:
            raise ValueError(f"parameter {name}={v[name]!r}: {what}")

    topics = list(v["camera_topics"])
    need(
        len(topics) > 0 and all(isinstance(t, str) and t.strip() for t in topics),
        "camera_topics",
        "give at least one non-empty topic",
    )
    need(len(set(topics)) == len(topics), "camera_topics", "topics must be distinct")
    transports = list(v["camera_transports"])
    need(
        len(transports) in (1, len(topics)) and all(t in TRANSPORTS for t in transports),
        "camera_transports",
        f"one entry or one per topic, each in {TRANSPORTS}",
    )
    names = list(v["camera_names"])
    need(len(names) <= len(topics), "camera_names", "at most one name per topic")
    need(all(" " not in n and ">" not in n for n in names), "camera_names", "names cannot hold spaces or '>'")
    need(v["qos_reliability"] in ("best_effort", "reliable"), "qos_reliability", "best_effort or reliable")
    need(v["qos_depth"] >= 1, "qos_depth", "must be >= 1")
    need(
        math.isfinite(v["max_camera_rate_hz"]) and 0.0 <= v["max_camera_rate_hz"] <= 10000.0,
        "max_camera_rate_hz",
        "must be a finite number of messages per second in [0, 10000] (0: no limit)",
    )
    need(
        math.isfinite(v["sample_rate_hz"]) and 0.0 <= v["sample_rate_hz"] <= 1000.0,
        "sample_rate_hz",
        "must be a finite number of frames per second in [0, 1000] (0: every frame)",
    )
    need(0.0 <= v["duplicate_threshold"] < 1.0, "duplicate_threshold", "must be in [0, 1)")
    need(64 <= v["max_frame_pixels"] <= 2**31 - 1, "max_frame_pixels", "must be in 64..2147483647 pixels")
    need(
        math.isfinite(v["max_stamp_skew_s"]) and v["max_stamp_skew_s"] >= 0,
        "max_stamp_skew_s",
        "must be a finite number of seconds >= 0 (0: no check)",
    )
    need(
        math.isfinite(v["clock_reset_s"]) and v["clock_reset_s"] > 0,
        "clock_reset_s",
        "must be a finite number of seconds > 0",
    )
    need(v["pose_topic"] == "" or bool(v["pose_topic"].strip()), "pose_topic", "a topic name, or '' for none")
    need(v["pose_msg_type"] in POSE_MSG_TYPES, "pose_msg_type", f"one of {POSE_MSG_TYPES}")
    need(
        math.isfinite(v["pose_tolerance_s"]) and 0 < v["pose_tolerance_s"] <= 60,
        "pose_tolerance_s",
        "must be in (0, 60] seconds",
    )
    need(
        math.isfinite(v["near_radius_m"]) and v["near_radius_m"] > 0,
        "near_radius_m",
        "must be a finite number of metres > 0",
    )
    need(
        v["novelty_threshold"] == -1.0 or 0.0 <= v["novelty_threshold"] <= 1.0,
        "novelty_threshold",
        "must be in [0, 1], or -1 for the model family's default",
    )
    need(v["precision"] in PRECISIONS, "precision", f"one of {PRECISIONS}")
    need(v["precision"] != "int8" or v["device"] == "cpu", "device", "cpu with precision int8")
    need(v["backend"] in BACKENDS, "backend", f"one of {BACKENDS}")
    need(v["backend"] != "tensorrt" or v["device"].startswith("cuda"), "device", "cuda with backend tensorrt")
    need(v["backend"] != "onnxruntime" or v["device"] == "cpu", "device", "cpu with backend onnxruntime")
    need(bool(str(v["engine_dir"]).strip()), "engine_dir", "a folder path")
    device = v["device"]
    need(
        device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()),
        "device",
        "cpu, cuda or cuda:N",
    )
    need(
        v["cache.max_chunk"] == 0 or v["cache.max_chunk"] >= 8,
        "cache.max_chunk",
        "must be >= 8, or 0 for the session's default",
    )
    need(v["cache.vision_budget"] >= -1, "cache.vision_budget", "must be -1 (the policy's default) or >= 0")
    # The cache's own rules (kvcache/): the policy, its counts, beta, decay, the vision budget,
    # the capacity and the slack. The capacity is checked again by the session once the system
    # prompt's length (sinks 0) and the chunk are known.
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
        need(False, f"cache.{exc.setting}", str(exc))
    need(
        math.isfinite(v["familiar_interval_s"]) and v["familiar_interval_s"] >= 0.0,
        "familiar_interval_s",
        "must be a finite number of seconds >= 0",
    )
    need(1 <= v["max_new_tokens"] <= 1024, "max_new_tokens", "must be in 1..1024")
    need(1 <= v["max_question_tokens"] <= 4096, "max_question_tokens", "must be in 1..4096")
    need(
        math.isfinite(v["answer.timeout_s"]) and v["answer.timeout_s"] >= 0,
        "answer.timeout_s",
        "must be a finite number of seconds >= 0 (0: no deadline)",
    )
    need(
        v["system_prompt"] == "" or bool(v["system_prompt"].strip()),
        "system_prompt",
        "must be '' (the family's) or hold text",
    )
    need(
        math.isfinite(v["answer.repetition_penalty"]) and v["answer.repetition_penalty"] > 0,
        "answer.repetition_penalty",
        "must be a finite number > 0 (1.0: off)",
    )
    need(0 <= v["answer.no_repeat_ngram_size"] <= 64, "answer.no_repeat_ngram_size", "must be in 0..64 (0: off)")
    need(v["answer.sentence_stop_words"] >= 0, "answer.sentence_stop_words", "must be >= 0 (0: off)")
    need(
        math.isfinite(v["answer.temperature"]) and 0 <= v["answer.temperature"] <= 10,
        "answer.temperature",
        "must be in [0, 10] (0: greedy)",
    )
    need(math.isfinite(v["answer.top_p"]) and 0 < v["answer.top_p"] <= 1, "answer.top_p", "must be in (0, 1]")
    need(v["answer.seed"] >= -1, "answer.seed", "must be >= 0, or -1 for a fresh seed per answer")
    need(0 <= v["answer.evidence_sightings"] <= 10, "answer.evidence_sightings", "must be in 0..10")
    need(math.isfinite(v["answer.seen_threshold"]), "answer.seen_threshold", "must be a finite number")
    need(
        math.isfinite(v["diagnostics_period_s"]) and 0 < v["diagnostics_period_s"] <= 3600,
        "diagnostics_period_s",
        "must be in (0, 3600] seconds",
    )
    need(
        math.isfinite(v["memory_image_period_s"]) and v["memory_image_period_s"] >= 0,
        "memory_image_period_s",
        "must be a finite number of seconds >= 0 (0: off)",
    )
    need(
        math.isfinite(v["memory_save_period_s"]) and v["memory_save_period_s"] >= 0,
        "memory_save_period_s",
        "must be a finite number of seconds >= 0 (0: at shutdown only)",
    )
    need(v["memory_save_period_s"] == 0 or bool(v["memory_file"].strip()), "memory_save_period_s", "needs memory_file")
    need(v["memory_dir"] == "" or bool(v["memory_dir"].strip()), "memory_dir", "a folder path, or '' for memory_file's")

    def ros_name(field: str) -> str:
        for group in ("cache", "answer"):
            if field.startswith(group + "_"):
                return field.replace("_", ".", 1)
        return field

    kwargs = {f.name: v[ros_name(f.name)] for f in fields(NodeConfig)}
    for key in ("camera_topics", "camera_transports", "camera_names"):
        kwargs[key] = tuple(kwargs[key])
    return NodeConfig(**kwargs)
