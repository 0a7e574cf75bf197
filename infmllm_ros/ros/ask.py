"""``infmllm-ask "question"``: the operator's console client for the node's ``/ask`` service.

Prints the answer, when its object was seen (the best-matching frames' stamps) and the figures
(frames and time span in context, KV tokens, latency). Exit
status 0 on an answer, 1 on a refusal (``success=false``) or a timeout, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from infmllm_interfaces.srv import Ask

from .stamps import stamp_seconds


def call_ask(node: Node, service: str, question: str, max_new_tokens: int = 0,
             keep_in_context: bool = False, timeout_s: float = 120.0):
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
        future = client.call_async(Ask.Request(question=question, max_new_tokens=max_new_tokens,
                                               keep_in_context=keep_in_context))
        future.add_done_callback(lambda _: done.set())
        done.wait(max(0.0, deadline - time.monotonic()))
        return future.result() if future.done() else None
    finally:
        node.destroy_client(client)


def format_response(response) -> str:
    """Human-readable lines for an ``Ask.Response``."""
    if not response.success:
        return f"refused: {response.message}" + (f"\n(partial answer: {response.answer})" if response.answer else "")
    first, last = stamp_seconds(response.first_frame_stamp), stamp_seconds(response.last_frame_stamp)
    seen = ", ".join(f"{stamp_seconds(t):.1f}" + (f" {c}" if c else "") + f" (match {s:.2f})"
                     for t, s, c in zip(response.sighting_stamps, response.sighting_scores,
                                        list(response.sighting_cameras) or [""] * len(response.sighting_scores)))
    return (f"{response.answer}\n" + (f"-- {response.message}\n" if response.stopped else "") +
            f"-- {'seen' if response.seen else 'not seen'} (confidence {response.confidence:.2f}); "
            f"{response.evidence or 'no memory line'}\n"
            f"-- seen at stamps: {seen or 'no frame with vision tokens in context'}\n"
            f"-- {response.frames_in_context} frames in context spanning {last - first:.1f} s "
            f"(stamps {first:.1f} .. {last:.1f}), {response.tokens_in_cache} KV tokens, "
            f"{response.latency_s:.2f} s")


def main(argv=None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="infmllm-ask", description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--service", default="/ask", help="service name (default /ask)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the node's default")
    parser.add_argument("--keep", action="store_true", help="keep the Q/A in the stream's context")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    args = parser.parse_args(argv)
    if not args.question.strip():
        parser.error("question is empty")
    rclpy.init()
    node = rclpy.create_node("infmllm_ask")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
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
