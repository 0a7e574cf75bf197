"""``infmllm-ask "question"``: the operator's console client for the node's ``/ask`` service.

Prints the answer, when its object was seen (the best-matching frames' stamps) and the figures
(frames and time span in context, KV tokens, latency). ``--stream`` asks through the ``ask``
action instead and prints the answer as it is decoded (Ctrl-C cancels it; the stream is left as
it was before the question). Exit status 0 on an answer, 1 on a refusal (``success=false``), a
cancel or a timeout, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from types import SimpleNamespace

import rclpy
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

from infmllm_interfaces.action import Ask as AskAction
from infmllm_interfaces.srv import Ask

from ..ros.interface import ANSWER_FIELDS
from ..ros.stamps import stamp_seconds


def call_ask(
    node: Node,
    service: str,
    question: str,
    max_new_tokens: int = 0,
    keep_in_context: bool = False,
    timeout_s: float = 120.0,
):
    """Call ``service`` from ``node`` (which an executor spins on another thread) and wait.

    Returns:
        ``Ask.Response``, or ``None`` when the service did not appear or answer within
        ``timeout_s`` seconds (the wait includes discovery).
    """
    client = node.create_client(Ask, service)
    deadline = time.monotonic() + timeout_s
    try:
        if not client.wait_for_service(timeout_sec=timeout_s):
            return None
        done = threading.Event()
        future = client.call_async(
            Ask.Request(question=question, max_new_tokens=max_new_tokens, keep_in_context=keep_in_context)
        )
        future.add_done_callback(lambda _: done.set())
        done.wait(max(0.0, deadline - time.monotonic()))
        return future.result() if future.done() else None
    finally:
        node.destroy_client(client)


#: Seconds a goal's result may take before it is asked for again (see :func:`stream_ask`).
RESULT_RETRY_S = 2.0


def stream_ask(
    node: Node,
    action: str,
    question: str,
    max_new_tokens: int = 0,
    keep_in_context: bool = False,
    timeout_s: float = 120.0,
    on_feedback=lambda feedback: None,
    cancel: threading.Event | None = None,
    client: ActionClient | None = None,
):
    """Send an ``Ask`` action goal from ``node`` (spun on another thread) and wait for its result.

    ``on_feedback`` gets each ``Ask.Feedback`` (the text so far); setting ``cancel`` cancels the
    goal. ``client``: an ``ActionClient`` for ``action`` that outlives the call (a caller asking
    many questions creates one: a fresh client's goal request can be lost while the server has
    not yet discovered it, and the goal then never starts); None: one made for this call.
    Returns ``Ask.Result``, or None when the server did not appear, refused the goal or did not
    finish within ``timeout_s`` seconds.
    """
    own = client is None
    client = ActionClient(node, AskAction, action) if own else client
    deadline = time.monotonic() + timeout_s
    try:
        if not client.wait_for_server(timeout_sec=timeout_s):
            return None
        sent = client.send_goal_async(
            AskAction.Goal(question=question, max_new_tokens=max_new_tokens, keep_in_context=keep_in_context),
            feedback_callback=lambda m: on_feedback(m.feedback),
        )
        while not sent.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        handle = sent.result() if sent.done() else None
        if handle is None or not handle.accepted:
            return None
        result = handle.get_result_async()
        cancelled, asked_s = False, time.monotonic()
        while not result.done() and time.monotonic() < deadline:
            if cancel is not None and cancel.is_set() and not cancelled:
                handle.cancel_goal_async()
                cancelled = True
            if time.monotonic() - asked_s > RESULT_RETRY_S:
                # No result yet: ask again. A request or response sent before this fresh client's
                # endpoints were matched is lost, and so can the status that says the goal has
                # finished; the server keeps the result and answers a request for a running goal
                # when it finishes, so a repeated request costs nothing but a wait.
                result, asked_s = handle.get_result_async(), time.monotonic()
            time.sleep(0.01)
        return result.result().result if result.done() else None
    finally:
        if own:
            client.destroy()


def format_response(response) -> str:
    """Human-readable lines for an ``Ask.Response``."""
    if not response.success:
        return f"refused: {response.message}" + (f"\n(partial answer: {response.answer})" if response.answer else "")
    first, last = stamp_seconds(response.first_frame_stamp), stamp_seconds(response.last_frame_stamp)
    seen = ", ".join(
        f"{stamp_seconds(t):.1f}" + (f" {c}" if c else "") + f" (match {s:.2f})"
        for t, s, c in zip(
            response.sighting_stamps,
            response.sighting_scores,
            list(response.sighting_cameras) or [""] * len(response.sighting_scores),
        )
    )
    return (
        f"{response.answer}\n"
        + (f"-- {response.message}\n" if response.stopped else "")
        + f"-- {response.verdict or ('seen' if response.seen else 'not seen')} (confidence {response.confidence:.2f}); "
        f"{response.evidence or 'no memory line'}"
        + (
            " (the model's text contradicted it: answered with the evidence)"
            if response.answer_source == "evidence"
            else ""
        )
        + "\n"
        f"-- seen at stamps: {seen or 'no frame with vision tokens in context'}\n"
        f"-- {response.frames_in_context} frames in context spanning {last - first:.1f} s "
        f"(stamps {first:.1f} .. {last:.1f}), {response.tokens_in_cache} KV tokens, "
        f"{response.latency_s:.2f} s"
    )


def main(argv=None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="infmllm-ask", description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--service", default="/ask", help="service name (default /ask)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the node's default")
    parser.add_argument("--keep", action="store_true", help="keep the Q/A in the stream's context")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    parser.add_argument(
        "--stream",
        action="store_true",
        help="ask through the action and print the answer as it is decoded (Ctrl-C cancels)",
    )
    args = parser.parse_args(argv)
    if not args.question.strip():
        parser.error("question is empty")
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)  # Ctrl-C cancels, then we shut down
    node = rclpy.create_node("infmllm_ask")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        if args.stream:
            printed = [0]

            def show(feedback):
                print(feedback.text[printed[0] :], end="", flush=True)
                printed[0] = len(feedback.text)

            cancel, box = threading.Event(), []
            asking = threading.Thread(
                target=lambda: box.append(
                    stream_ask(
                        node, args.service, args.question, args.max_new_tokens, args.keep, args.timeout, show, cancel
                    )
                )
            )
            asking.start()
            try:
                while asking.is_alive():
                    asking.join(0.1)
            except KeyboardInterrupt:  # cancel the goal, then wait for its result
                cancel.set()
                asking.join(args.timeout)
            print()
            result = box[0] if box else None
            response = (
                None
                if result is None
                else SimpleNamespace(
                    success=result.success,
                    message=result.message,
                    **{name: getattr(result.answer, name) for name in ANSWER_FIELDS},
                )
            )
        else:
            response = call_ask(node, args.service, args.question, args.max_new_tokens, args.keep, args.timeout)
    finally:
        executor.shutdown()
        spinner.join(5.0)
        node.destroy_node()
        rclpy.try_shutdown()
    if response is None:
        print(f"no answer from {args.service} within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    print(format_response(response))
    return 0 if response.success else 1


if __name__ == "__main__":
    sys.exit(main())
