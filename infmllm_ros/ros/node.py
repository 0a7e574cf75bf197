"""``infmllm-node`` (``ros2 run infmllm_ros infmllm_node``): cameras in, ``/ask`` answered.

Graph interface (names relative to the node's namespace unless absolute):

* subscribes: ``camera_topics`` (``sensor_msgs/CompressedImage`` or ``sensor_msgs/Image``), best
  effort keep-last 1 by default (overridable by parameter), on the node ``<name>_cameras`` read at
  most ``max_camera_rate_hz`` per camera on a thread of its own (:mod:`.intake`);
* service ``ask`` (``infmllm_interfaces/srv/Ask``) and action ``ask``
  (``infmllm_interfaces/action/Ask``: the answer streamed as feedback, cancel stops it and leaves
  the stream as before the question): one answer at a time over both, a second concurrent
  request is refused at once with ``success=false``;
* services ``~/save_memory``, ``~/load_memory`` (``infmllm_interfaces/srv/MemoryFile``) and
  ``~/reset_memory`` (``std_srvs/Trigger``);
* publishes ``~/memory_image`` (``sensor_msgs/Image``, every ``memory_image_period_s``: the
  frames still in the KV cache, :mod:`.memory_image`), ``~/answers``
  (``infmllm_interfaces/msg/Answer``), ``/diagnostics``
  (``diagnostic_msgs/DiagnosticArray``) every ``diagnostics_period_s``, and ``~/frames``
  (``std_msgs/Header``, one per received frame once handled: stamp = the frame's stamp,
  ``frame_id`` = ``camera:outcome``; replay tools pace themselves on it).

Threads: a :class:`MultiThreadedExecutor` runs the services, the action and the timers; the
cameras and the pose topic are read on threads of their own (:mod:`.intake`); one
:class:`IngestWorker` thread runs the model: ingest, and each ``/ask`` handed to it ahead of
pending frames (the service callback waits for it; frames keep arriving meanwhile and the newest
is kept). The main thread waits for SIGINT/SIGTERM; then an answer being decoded stops at its
next token and is replied to (``stopped="shutdown"``, ``success=false``), new questions are
refused, the worker finishes the frame in hand, and the node exits 0 (within a few seconds: one
frame and one token).

Limits (README, "Limits"): ``max_frame_pixels``, ``max_stamp_skew_s``, ``clock_reset_s``,
``max_question_tokens``, ``max_new_tokens`` (<= 1024), ``answer.timeout_s``. Every refusal is
counted in ``/diagnostics``; questions and answers are logged cut to 80 characters unless
``log_full_text``.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from infmllm_interfaces.action import Ask as AskAction
from infmllm_interfaces.msg import Answer
from infmllm_interfaces.srv import Ask, MemoryFile

from ..models import load_model
from ..runtime.file_safety import remove_stale_temps, resolve_inside, set_aside
from ..runtime.memory_file import MemoryFileRefused
from ..runtime.pose import PoseMatcher
from ..runtime.procstat import limit_malloc_arenas, rss_mib
from ..runtime.session import QuestionTooLong, Stopped, open_session
from .intake import CameraIntake, PoseIntake
from .interface import ANSWER_FIELDS
from .memory_image import mosaic
from .params import PARAMETERS, Param, type_problem, validate
from .poses import message_class, to_pose, to_pose_msg
from .shared_memory import transport_status
from .stamps import stamp_problem, stamp_seconds, to_time
from .worker import BAD_OUTCOMES, OUTCOMES, IngestWorker, PendingFrame

#: /ask outcomes counted since the node started: counter -> its key in ``/diagnostics``. A cut
#: answer is counted under its :class:`~infmllm_ros.runtime.session.Stopped` reason.
ASK_COUNTERS = {
    "answered": "asks_answered",
    "failed": "asks_failed",
    "refused_busy": "asks_refused_busy",
    "refused_too_long": "asks_refused_too_long",
    Stopped.DEADLINE: "asks_stopped_deadline",
    Stopped.SHUTDOWN: "asks_stopped_shutdown",
    Stopped.CANCELLED: "asks_cancelled",
    "from_evidence": "asks_answered_from_evidence",
}


class AnyEvent:
    """Set when any of ``events`` is set (what :meth:`StreamSession.ask` reads as ``cancel``)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def open_memory_folder(cfg) -> tuple[Path | None, Path | None, list[Path]]:
    """``(memory folder, memory file, stale temporary files removed)`` for ``cfg``: the folder
    (:attr:`NodeConfig.memory_folder`) is created if missing and cleared of the temporary files of
    interrupted saves; ``memory_file`` must resolve inside it (relative names are taken inside
    ``memory_dir`` when that is set). ``(None, None, [])`` when neither is set.

    Raises:
        ValueError: ``memory_file`` resolves outside the folder, or the folder cannot be created.
    """
    folder = cfg.memory_folder
    if folder is None:
        return None, None, []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temps(folder)
    except OSError as exc:
        raise ValueError(f"parameter memory_dir: cannot use the memory folder {folder}: {exc}") from None
    try:
        path = resolve_inside(folder, Path(cfg.memory_file).expanduser()) if cfg.memory_file else None
    except ValueError as exc:
        raise ValueError(f"parameter memory_file={cfg.memory_file!r}: {exc}") from None
    return folder.resolve(), path, removed


def report(logger, ok: bool, message: str) -> None:
    """Log ``message`` as info when ``ok``, else as an error (rclpy wants one severity per call site)."""
    if ok:
        logger.info(message)
    else:
        logger.error(message)


class InfMLLMNode(LifecycleNode):
    """The stream-memory node, a managed (lifecycle) node.

    * ``configure``: validate the parameters, load the model, allocate the KV buffer, restore
      ``memory_file`` if set, start the worker. A failure returns FAILURE with the reason logged
      (:attr:`configure_error`); the process stays up, unconfigured.
    * ``activate``: subscribe to the cameras (ingest starts).
    * ``deactivate``: unsubscribe (ingest stops); memory is kept and questions are still answered.
    * ``cleanup``: save ``memory_file`` if set, stop the worker, free the model.
    * ``shutdown``: save ``memory_file`` if set, stop the worker.

    Services, the action and ``/diagnostics`` exist in every state; questions are refused until
    the node is configured. :func:`main` configures and activates at start unless the
    ``autostart`` parameter is false (a lifecycle manager then drives it).
    """

    def __init__(self, **node_kwargs):
        super().__init__("infmllm", **node_kwargs)
        self._wrong_types: dict[str, object] = {}  # name -> a given value of another type
        for p in PARAMETERS:
            self._declare(p)
        self.config = None
        self.model = self.session = self.worker = None
        self.configure_error = ""
        self._intake, self._memory_timer, self._image_timer = None, None, None
        self._poses: PoseIntake | None = None
        self._camera_counts: dict[str, tuple[int, int]] = {}
        self._memory_dir = self._memory_path = None
        self.shared_memory = transport_status()  # this process's participant has just started
        if self.shared_memory.startswith("off"):
            self.get_logger().warning(f"DDS shared memory {self.shared_memory}")
        self.stopping = threading.Event()  # set at SIGINT/SIGTERM: the answer in flight stops
        self.frames_pub = self.create_publisher(Header, "~/frames", 50)
        self.answers_pub = self.create_publisher(Answer, "~/answers", 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.memory_image_pub = self.create_publisher(Image, "~/memory_image", 1)
        self._ask_lock = threading.Lock()
        self._serving, self._serving_lock = 0, threading.Lock()  # /ask callbacks not yet returned
        self._ask_counts = dict.fromkeys(ASK_COUNTERS, 0)
        self._answer_speed = (math.nan, math.nan)  # the last answer's decode tokens/s and TTFT (s)
        questions = ReentrantCallbackGroup()
        self.create_service(Ask, "ask", self._on_ask, callback_group=questions)
        self._action = ActionServer(
            self,
            AskAction,
            "ask",
            self._on_ask_goal,
            callback_group=questions,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal: CancelResponse.ACCEPT,
        )
        self._memory_group = MutuallyExclusiveCallbackGroup()
        self.create_service(
            MemoryFile, "~/save_memory", self._memory_file_service(self._save_memory), callback_group=self._memory_group
        )
        self.create_service(
            MemoryFile, "~/load_memory", self._memory_file_service(self._load_memory), callback_group=self._memory_group
        )
        self.create_service(Trigger, "~/reset_memory", self._on_reset_memory, callback_group=self._memory_group)
        self._last_diag = (time.monotonic(), 0)
        period = self.get_parameter("diagnostics_period_s").value
        self.create_timer(
            period if isinstance(period, float) and 0 < period <= 3600 else 1.0,
            self._publish_diagnostics,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        self.add_on_set_parameters_callback(self._on_set_parameters)

    def _declare(self, p: Param) -> None:
        """Declare ``p`` with its descriptor and the value given for it (parameter file,
        ``--ros-args -p``). A given value of another ROS type would make rclpy raise here and end
        the process: an integer given for a double is declared as that double; anything else is
        declared as the default and kept aside for configure, which validates it as given (and
        refuses a wrong type by name)."""
        descriptor = ParameterDescriptor(description=p.description, read_only=not p.dynamic)
        try:
            self.declare_parameter(p.name, p.default, descriptor)
        except InvalidParameterTypeException:
            given = self._parameter_overrides[p.name].value  # rclpy keeps the given values here
            problem = type_problem(p, given)
            if isinstance(p.default, float) and not problem:
                self.declare_parameter(p.name, float(given), descriptor, ignore_override=True)
                return
            self._wrong_types[p.name] = given  # configure validates it as given
            if problem:
                self.get_logger().error(f"parameter {p.name}={given!r}: {problem}; configure refuses it")
            self.declare_parameter(p.name, p.default, descriptor, ignore_override=True)

    def _parameter_values(self) -> dict:
        """Every parameter's declared value by name."""
        return {p.name: self.get_parameter(p.name).value for p in PARAMETERS}

    @property
    def lifecycle_state(self) -> str:
        """The lifecycle state's label ("unconfigured", "inactive", "active", "finalized", ...)."""
        return self._state_machine.current_state[1]

    # ---- lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            cfg = validate({**self._parameter_values(), **self._wrong_types})
            memory_dir, memory_path, stale = open_memory_folder(cfg)
            for tmp in stale:
                log.warning(f"removed {tmp}, the temporary file of a save that was interrupted")
            log.info(f"loading model {cfg.model!r} on {cfg.device} ({cfg.backend} backend) ...")
            t0 = time.perf_counter()
            model = load_model(cfg.model, cfg.device, cfg.precision)
            session = open_session(model, progress=log.info, **cfg.session_kwargs())
        except (ValueError, FileNotFoundError, RuntimeError) as exc:  # parameters, model, engine, device
            self.configure_error = str(exc)
            log.error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.config, self.model, self.session, self.configure_error = cfg, model, session, ""
        self._memory_dir, self._memory_path = memory_dir, memory_path
        self._kv_bytes = session.cache.nbytes
        log.info(
            f"model {model.name} ({model.family} family) ready in {time.perf_counter() - t0:.1f} s; "
            f"KV cache {cfg.cache_capacity} tokens ({self._kv_bytes / 2**20:.1f} MiB, {cfg.cache_policy}), "
            f"system prompt {session.cache.length} tokens"
        )
        self.worker = IngestWorker(
            session,
            cfg.sample_rate_hz,
            cfg.duplicate_threshold,
            on_done=self._frame_done,
            log=log.warning,
            max_frame_pixels=cfg.max_frame_pixels,
            clock_reset_s=cfg.clock_reset_s,
            poses=PoseMatcher(cfg.pose_tolerance_s) if cfg.pose_topic else None,
        )
        if memory_path is not None and memory_path.is_file():
            ok, message = self._load_memory(memory_path)
            (log.info if ok else log.warning)(message if ok else f"{message}; starting with empty memory")
        self.worker.start()
        if cfg.memory_save_period_s > 0:
            self._memory_timer = self.create_timer(
                cfg.memory_save_period_s, self._save_periodically, callback_group=self._memory_group
            )
        if cfg.memory_image_period_s > 0:
            self._image_timer = self.create_timer(
                cfg.memory_image_period_s, self._publish_memory_image, callback_group=MutuallyExclusiveCallbackGroup()
            )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        cfg, log = self.config, self.get_logger()
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=cfg.qos_depth,
            reliability=ReliabilityPolicy.BEST_EFFORT
            if cfg.qos_reliability == "best_effort"
            else ReliabilityPolicy.RELIABLE,
        )
        self._intake = CameraIntake(
            self, cfg.cameras, qos, self._on_image, cfg.max_camera_rate_hz, cfg.max_frame_pixels
        )
        for topic, (_, camera, compressed) in zip(self._intake.resolved_topics(), cfg.cameras):
            log.info(f"watching {topic} ({'CompressedImage' if compressed else 'Image'}) as cam={camera}")
        self._intake.start()
        if cfg.pose_topic:
            kind = cfg.pose_msg_type
            self._poses = PoseIntake(self, cfg.pose_topic, message_class(kind), lambda msg: self._on_pose(msg, kind))
            self._poses.start()
            log.info(
                f"poses from {self._poses.subscription.topic_name} ({kind}), matched to frames within "
                f"{cfg.pose_tolerance_s:g} s"
            )
        log.info(f"ready: /ask at {self.resolve_service_name('ask')}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_intake()
        self.get_logger().info("inactive: cameras unsubscribed; memory kept, questions still answered")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_stream()
        self.model = self.session = self.worker = self.config = None
        self.get_logger().info("cleaned up: model and KV buffer freed")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.session is not None:
            self._stop_stream()
        return TransitionCallbackReturn.SUCCESS

    def _stop_stream(self) -> None:
        """Stop the worker (it finishes the frame in hand), save memory if configured, log the
        final counts. Logs with the process logger: after SIGINT /rosout cannot publish."""
        self._stop_intake()
        for timer in (self._memory_timer, self._image_timer):
            if timer is not None:
                self.destroy_timer(timer)
        self._memory_timer = self._image_timer = None
        stopped = self.worker.stop()
        log = rclpy.logging.get_logger("infmllm")
        if self._memory_path is not None and stopped:
            ok, message = self._save_memory(self._memory_path)
            report(log, ok, message)
        s = self.worker.stats()
        log.info(
            f"stream stopped: {s.outcomes['ingested']} frames ingested, "
            f"{s.outcomes['dropped']} dropped, {s.outcomes['rejected']} rejected"
            + ("" if stopped else "; ingest worker did not stop in time")
        )

    # ---- cameras -------------------------------------------------------------------------
    def _stop_intake(self) -> None:
        """Unsubscribe the cameras and the pose topic; their counts stay in ``/diagnostics``."""
        if self._poses is not None:
            self._poses.stop()
            self._poses = None
        if self._intake is not None:
            self._intake.stop()
            self._camera_counts = self.camera_counts()  # this intake's counts join the earlier ones
            self._intake = None

    def _on_pose(self, msg, kind: str) -> None:
        """A pose message: checked, then matched to the frames around its stamp by the worker."""
        try:
            stamp_s, pose = to_pose(msg, kind)
        except ValueError as exc:
            self.worker.add_pose(math.nan, None, str(exc))
            return
        self.worker.add_pose(stamp_s, pose)

    def camera_counts(self) -> dict[str, tuple[int, int]]:
        """``camera -> (frames read, frames replaced unread in DDS)`` since the node started."""
        counts = dict(self._camera_counts)
        if self._intake is not None:
            for camera, (read, unread) in self._intake.stats().items():
                r, u = counts.get(camera, (0, 0))
                counts[camera] = (r + read, u + unread)
        return counts

    def _on_image(self, msg, camera: str, compressed: bool) -> None:
        stamp = stamp_seconds(msg.header.stamp)
        now = self.get_clock().now().nanoseconds * 1e-9  # sim time when replaying; 0 before /clock
        if stamp == 0.0:  # unstamped driver: use the node clock
            stamp = now
        frame = PendingFrame(camera, stamp, msg, compressed)
        problem = stamp_problem(msg.header.stamp, now, self.config.max_stamp_skew_s)
        if problem:
            self.worker.reject(frame, "bad_stamp", problem)
        else:
            self.worker.offer(frame)

    def _frame_done(self, frame: PendingFrame, outcome: str, detail: str) -> None:
        self.frames_pub.publish(Header(stamp=to_time(frame.stamp_s), frame_id=f"{frame.camera}:{outcome}"))

    # ---- questions -----------------------------------------------------------------------
    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        msg, refusal = self._answer(request.question, request.max_new_tokens, request.keep_in_context)
        for name in ANSWER_FIELDS:
            setattr(response, name, getattr(msg, name))
        response.success, response.message = self._outcome(msg, refusal)
        return response

    def _on_ask_goal(self, goal_handle) -> AskAction.Result:
        goal = goal_handle.request
        cancel = AnyEvent(self.stopping, threading.Event())
        tokenizer = self.session.tokenizer

        def on_token(ids: list[int]) -> None:
            if goal_handle.is_cancel_requested:
                cancel.events[1].set()
            goal_handle.publish_feedback(AskAction.Feedback(text=tokenizer.decode(ids).strip(), tokens=len(ids)))

        msg, refusal = self._answer(goal.question, goal.max_new_tokens, goal.keep_in_context, cancel, on_token)
        success, message = self._outcome(msg, refusal)
        if msg.stopped == Stopped.CANCELLED:
            goal_handle.canceled()
        elif success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return AskAction.Result(success=success, message=message, answer=msg)

    def _outcome(self, msg: Answer, refusal: str) -> tuple[bool, str]:
        """``(success, message)`` of an answer from :meth:`_answer`."""
        if refusal:
            return False, refusal
        return msg.stopped in (Stopped.NONE, Stopped.DEADLINE), {
            Stopped.NONE: "",
            Stopped.DEADLINE: f"answer cut at answer.timeout_s={self.config.answer_timeout_s:g} s; the text is partial",
            Stopped.SHUTDOWN: "shutting down: the answer was cut; the text is partial",
            Stopped.CANCELLED: "cancelled: the answer was cut; the stream is as it was before the question",
        }[Stopped(msg.stopped)]

    def _answer(
        self, question: str, max_new_tokens: int, keep_in_context: bool, cancel=None, on_token=None
    ) -> tuple[Answer, str]:
        """Answer one question on the worker thread, one at a time: ``(the ~/answers message, "")``,
        or ``(a message with the question and latency only, the reason it was refused)``."""
        with self._serving_lock:
            self._serving += 1
        try:
            return self._answer_once(question, max_new_tokens, keep_in_context, cancel or self.stopping, on_token)
        finally:
            with self._serving_lock:
                self._serving -= 1

    def _answer_once(self, question, max_new_tokens, keep_in_context, cancel, on_token) -> tuple[Answer, str]:
        t0 = time.perf_counter()
        log = self.get_logger()

        def refuse(message: str, counter: str = "failed") -> tuple[Answer, str]:
            self._ask_counts[counter] += 1
            log.warning(f"/ask {self._loggable(question)} refused: {message}")
            return Answer(question=question, latency_s=time.perf_counter() - t0), message

        if self.session is None:
            return refuse(f"not configured (lifecycle state {self.lifecycle_state})")
        if not self._ask_lock.acquire(blocking=False):
            return refuse("busy: another question is being answered; ask again when it returns", "refused_busy")
        try:
            stats = self.worker.stats()
            if self.session.frames_ingested == 0:  # none since the start, a reset, or in the loaded memory
                topics = ", ".join(self.resolve_topic_name(t) for t, _, _ in self.config.cameras)
                return refuse(
                    f"no camera frame has been ingested yet (watching {topics}; "
                    f"{stats.received} received, {stats.outcomes['rejected']} rejected)"
                )
            limit = max_new_tokens or self.config.max_new_tokens
            if self.stopping.is_set():
                return refuse("shutting down")
            timeout = self.config.answer_timeout_s
            deadline = time.monotonic() + timeout if timeout > 0 else None
            try:
                answer = self.worker.call(
                    lambda: self.session.ask(
                        question, limit, keep_in_context, deadline_s=deadline, cancel=cancel, on_token=on_token
                    )
                ).result()
            except QuestionTooLong as exc:
                return refuse(str(exc), "refused_too_long")
            except ValueError as exc:
                return refuse(str(exc))
            except Exception as exc:  # keep the node alive; the session restored its cache
                log.error(traceback.format_exc())
                return refuse(f"internal error while answering: {type(exc).__name__}: {exc}")
        finally:
            self._ask_lock.release()
        origin = stats.origin_s
        stopped = answer.stopped
        if stopped == Stopped.CANCELLED and self.stopping.is_set():
            stopped = Stopped.SHUTDOWN
        if stopped:
            self._ask_counts[stopped] += 1
        self._ask_counts["answered"] += 1
        self._answer_speed = (answer.decode_tokens_per_s, answer.ttft_s)
        msg = Answer(
            header=Header(stamp=self.get_clock().now().to_msg(), frame_id=self.get_name()),
            question=question,
            answer=answer.text,
            first_frame_stamp=to_time(origin + answer.first_frame_s),
            last_frame_stamp=to_time(origin + answer.last_frame_s),
            frames_in_context=answer.frames_in_context,
            tokens_in_cache=answer.tokens_in_cache,
            latency_s=time.perf_counter() - t0,
            sighting_stamps=[to_time(origin + s.stamp_s) for s in answer.sightings],
            sighting_scores=[s.score for s in answer.sightings],
            sighting_cameras=[s.camera for s in answer.sightings],
            sighting_poses=[to_pose_msg(s.pose) for s in answer.sightings],
            sighting_pose_known=[s.pose is not None for s in answer.sightings],
            pose_frame_id=next((s.pose.frame_id for s in answer.sightings if s.pose is not None), ""),
            seen=answer.seen,
            confidence=answer.confidence,
            verdict=answer.verdict,
            answer_source=answer.answer_source,
            evidence=answer.evidence,
            stopped=stopped,
        )
        if answer.answer_source == "evidence":
            self._ask_counts["from_evidence"] += 1
            log.warning(
                f"/ask {self._loggable(question)}: the model's answer contradicted its evidence "
                f"({'; '.join(answer.problems)}); answered with the evidence sentence"
            )
        self.answers_pub.publish(msg)
        seen = ", ".join(f"t={origin + s.stamp_s:.1f}s {s.camera} ({s.score:.2f})" for s in answer.sightings)
        log.info(
            f"/ask {self._loggable(question)} -> {self._loggable(answer.text)} "
            f"({msg.latency_s:.2f} s{', stopped: ' + stopped if stopped else ''}, "
            f"{answer.frames_in_context} frames in context; verdict {answer.verdict} "
            f"({answer.confidence:.2f}); best sightings: {seen or 'none'})"
        )
        return msg, ""

    # ---- memory on disk --------------------------------------------------------------------
    def _save_memory(self, path: Path) -> tuple[bool, str]:
        """Save the stream to ``path`` (call on the worker thread or with it stopped)."""
        try:
            size = self.session.save_memory(path, extra={"origin_s": self.worker.stats().origin_s})
        except OSError as exc:
            return False, f"cannot save memory to {path}: {exc}"
        return True, (
            f"saved {self.session.cache.length} KV slots, {self.session.frames_ingested} frames, "
            f"{size / 2**20:.1f} MiB to {path}"
        )

    def _load_memory(self, path: Path) -> tuple[bool, str]:
        """Load the stream from ``path`` (call on the worker thread or before it starts). A refused
        file is set aside intact (:func:`~infmllm_ros.runtime.file_safety.set_aside`), never
        overwritten by a later save."""
        try:
            extra = self.session.load_memory(path)
        except FileNotFoundError as exc:
            return False, f"memory file refused: {exc}"
        except MemoryFileRefused as exc:
            try:
                aside = set_aside(path, exc.reason)
            except OSError as err:
                return False, f"memory file refused: {exc}; it could not be set aside ({err}) and stays as it was"
            where = f"kept intact as {aside}" if aside else "kept as it was"
            return False, f"memory file refused: {exc}; {where}"
        self.worker.resume(extra.get("origin_s", math.nan))
        return True, (f"loaded {self.session.cache.length} KV slots, {self.session.frames_ingested} frames from {path}")

    def _memory_call(self, fn, response):
        """Run ``fn() -> (success, message)`` on the worker thread (between frames) into ``response``."""
        if self.worker is None:
            response.success, response.message = False, f"not configured (lifecycle state {self.lifecycle_state})"
            return response
        try:
            response.success, response.message = self.worker.call(fn).result()
        except RuntimeError as exc:  # the worker has stopped: shutting down
            response.success, response.message = False, str(exc)
        report(self.get_logger(), response.success, response.message)
        return response

    def _memory_file_service(self, fn):
        """A ``MemoryFile`` service callback that runs ``fn(path) -> (success, message)`` on the
        worker; the request's path, or ``memory_file`` when it is ""."""

        def serve(request: MemoryFile.Request, response: MemoryFile.Response):
            if not request.path:
                path = self._memory_path
                problem = "" if path else "no path given and no memory_file parameter set"
            elif self._memory_dir is None:
                path, problem = None, "no memory folder: set memory_dir (or memory_file)"
            else:
                try:
                    path, problem = resolve_inside(self._memory_dir, request.path), ""
                except ValueError as exc:
                    path, problem = None, f"refused: {exc}"
            if problem:
                response.success, response.message = False, problem
                report(self.get_logger(), False, problem)
                return response
            return self._memory_call(lambda: fn(path), response)

        return serve

    def _on_reset_memory(self, request: Trigger.Request, response: Trigger.Response):
        def reset():
            self.session.reset()
            return True, "memory reset: the KV cache holds the system prompt only"

        return self._memory_call(reset, response)

    def _save_periodically(self) -> None:
        try:
            self.worker.call(lambda: self._save_memory(self._memory_path)).add_done_callback(
                lambda f: (
                    None
                    if f.exception() is None and f.result()[0]
                    else self.get_logger().error(str(f.exception() or f.result()[1]))
                )
            )
        except RuntimeError:  # shutting down; the final save follows
            pass

    def _loggable(self, text: str) -> str:
        """``text`` quoted for the log: whole with ``log_full_text``, else its first 80 characters."""
        if (self.config is not None and self.config.log_full_text) or len(text) <= 80:
            return repr(text)
        return repr(text[:80]) + f"... ({len(text)} characters)"

    # ---- parameters and diagnostics -----------------------------------------------------
    def _on_set_parameters(self, params) -> SetParametersResult:
        values = {p.name: p.value for p in params}
        try:
            checked = validate({**self._parameter_values(), **values})
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        for name in values:
            self._wrong_types.pop(name, None)
        if self.worker is None:  # unconfigured: configure reads the parameters
            return SetParametersResult(successful=True)
        self.config = checked
        self.worker.sample_rate_hz = checked.sample_rate_hz
        self.worker.duplicate_threshold = checked.duplicate_threshold
        self.worker.max_frame_pixels, self.worker.clock_reset_s = checked.max_frame_pixels, checked.clock_reset_s
        if self._intake is not None:
            self._intake.set_max_pixels(checked.max_frame_pixels)
        self.session.answer_settings = checked.answer_settings  # read by the next answer
        return SetParametersResult(successful=True)

    def diagnostics(self) -> DiagnosticStatus:
        """The node's health and figures as one ``DiagnosticStatus`` (also used by tests)."""
        if self.session is None:
            reason = f": {self.configure_error}" if self.configure_error else ""
            return DiagnosticStatus(
                level=DiagnosticStatus.WARN,
                name=f"{self.get_fully_qualified_name()}: stream",
                message=f"{self.lifecycle_state}{reason}",
                values=[KeyValue(key="lifecycle_state", value=self.lifecycle_state)],
            )
        s = self.worker.stats()
        cache = self.session.cache
        now = time.monotonic()
        then, count = self._last_diag
        ingested = s.outcomes["ingested"]
        rate = (ingested - count) / (now - then) if now > then else 0.0
        self._last_diag = (now, ingested)
        values = {
            "frames_received": s.received,
            "frames_stored": s.stored,
            **{f"frames_{outcome}": s.outcomes[outcome] for outcome in OUTCOMES},
            "camera_clock_resets": s.clock_resets,
            "poses_received": s.poses_received,
            "poses_refused": s.poses_refused,
            "frames_with_pose": s.frames_with_pose,
            **{
                f"camera_{camera}_{what}": n
                for camera, counts in sorted(self.camera_counts().items())
                for what, n in zip(("read", "unread"), counts)
            },
            "ingest_rate_hz": f"{rate:.2f}",
            "ingest_ms_last": f"{s.last_ingest_ms:.1f}",
            "ingest_ms_mean": f"{s.mean_ingest_ms:.1f}",
            "vision_ms_last": f"{s.last_vision_ms:.1f}",
            "prefill_ms_last": f"{s.last_prefill_ms:.1f}",
            "kv_tokens": cache.length,
            "kv_capacity": cache.capacity,
            "kv_fill": f"{cache.length / cache.capacity:.3f}",
            "kv_evicted_tokens": cache.evicted_tokens,
            "kv_bytes": self._kv_bytes,
            "policy": self.config.cache_policy,
            **{key: self._ask_counts[counter] for counter, key in ASK_COUNTERS.items()},
            "decode_tokens_per_s": f"{self._answer_speed[0]:.1f}",
            "ttft_s": f"{self._answer_speed[1]:.3f}",
            "rss_mib": f"{rss_mib():.1f}",
            "dds_shared_memory": self.shared_memory,
            "last_error": s.last_error.splitlines()[0] if s.last_error else "",
            "lifecycle_state": self.lifecycle_state,
        }
        if self.lifecycle_state != "active":
            level, message = DiagnosticStatus.OK, f"{self.lifecycle_state}: not watching cameras, answering questions"
        elif ingested == 0:
            level, message = DiagnosticStatus.WARN, "waiting for camera frames"
        elif s.last_error and sum(s.outcomes[o] for o in BAD_OUTCOMES) > 0:
            level, message = DiagnosticStatus.WARN, f"streaming; last bad frame: {values['last_error']}"
        else:
            level, message = DiagnosticStatus.OK, f"streaming, {cache.length}/{cache.capacity} KV slots"
        return DiagnosticStatus(
            level=level,
            name=f"{self.get_fully_qualified_name()}: stream",
            message=message,
            hardware_id=self.config.device,
            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
        )

    def _publish_memory_image(self) -> None:
        session = self.session
        if session is None:
            return
        rgb = mosaic(session.memory_frames())
        h, w, _ = rgb.shape
        self.memory_image_pub.publish(
            Image(
                header=Header(stamp=self.get_clock().now().to_msg(), frame_id="memory"),
                height=h,
                width=w,
                encoding="rgb8",
                step=3 * w,
                data=rgb.tobytes(),
            )
        )

    def _publish_diagnostics(self) -> None:
        self.diag_pub.publish(
            DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[self.diagnostics()])
        )

    def answering(self) -> bool:
        """True while an ``/ask`` callback has not returned (its reply is not yet handed over)."""
        with self._serving_lock:
            return self._serving > 0


def main(argv=None) -> int:
    """Console entry point; returns the process exit status (2: with ``autostart``, bad parameters,
    model or engine: configure failed).

    rclpy's own signal handlers are off: SIGINT/SIGTERM set :attr:`InfMLLMNode.stopping`
    while the executor still spins, so the answer in flight is cut and its reply goes out
    before the context is shut down.
    """
    limit_malloc_arenas()
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    node = InfMLLMNode()
    if node.get_parameter("autostart").value:
        if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            rclpy.logging.get_logger("infmllm").fatal(f"cannot start: {node.configure_error}")
            node.destroy_node()
            rclpy.try_shutdown()
            return 2
        node.trigger_activate()
    else:
        node.get_logger().info("unconfigured: waiting for a lifecycle manager to configure and activate the node")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, name="infmllm-executor", daemon=True)
    spinner.start()
    while not stop.wait(0.5) and spinner.is_alive():
        pass
    node.stopping.set()  # the answer being decoded stops at its next token
    deadline = time.monotonic() + 3.0
    while node.answering() and time.monotonic() < deadline:  # let its reply go out
        time.sleep(0.05)
    time.sleep(0.2)  # the executor sends a reply after its callback returns
    executor.shutdown()  # no callback runs while the node's entities go away
    spinner.join(5.0)
    if node.lifecycle_state in ("unconfigured", "inactive", "active"):
        node.trigger_shutdown()  # saves memory_file if set
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
