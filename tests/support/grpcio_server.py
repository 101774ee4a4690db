#!/usr/bin/env python3
"""A real grpcio server for tower-lb's integration tests (tests/grpcio.rs).

Not a server of ours: Python's grpcio (gRPC's C core) answers, so the tests
see what a user's Python service sends, not what our own test servers do.

It serves, on 127.0.0.1 and a port the OS picks:

- the standard health service (grpc.health.v1.Health, from
  grpcio-health-checking), SERVING for "" and for fieldtest.Modes;
- fieldtest.Modes/Work, a generic handler of raw bytes (no generated code)
  that behaves as its mode (argv) says:
    serve             answers the request's bytes back at once;
    unavailable       fails with UNAVAILABLE at once;
    enforce-deadline  works --work seconds, checking the caller's deadline
                      every 5 ms, and fails with DEADLINE_EXCEEDED when it
                      has run out, as a server that honours deadlines does;
    early-deadline    fails with DEADLINE_EXCEEDED at once when the time the
                      caller has left is less than --work (no point
                      starting), otherwise works and answers;
    exit              exits the process mid-call, without an answer (its
                      connections end under the call, as in a crash).

It prints the bound port on stdout (one line), then serves until killed, or
until its stdin closes (so that it does not outlive a test that died).
"""

import argparse
import asyncio
import os
import sys
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "fieldtest.Modes"
MODES = ("serve", "unavailable", "enforce-deadline", "early-deadline", "exit")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument(
        "--work",
        type=float,
        default=1.0,
        help="seconds a Work call takes in the deadline modes",
    )
    return parser.parse_args()


def work_handler(mode, work_seconds):
    async def work(request, context):
        if mode == "exit":
            os._exit(3)
        if mode == "unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "mode: unavailable")
        left = context.time_remaining()
        if mode == "early-deadline" and left is not None and left < work_seconds:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{left:.3f}s left, the work takes {work_seconds:.3f}s",
            )
        if mode in ("enforce-deadline", "early-deadline"):
            loop = asyncio.get_running_loop()
            done_at = loop.time() + work_seconds
            while loop.time() < done_at:
                left = context.time_remaining()
                if left is not None and left <= 0:
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        "the caller's deadline ran out",
                    )
                await asyncio.sleep(0.005)
        return request

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            # No (de)serializers: the method takes and answers raw bytes.
            "Work": grpc.unary_unary_rpc_method_handler(work),
        },
    )


def exit_when_stdin_closes(loop, stop):
    """The test holds our stdin; its end means the test is gone."""

    def watch():
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch, daemon=True).start()


async def main():
    args = parse_args()
    server = grpc.aio.server()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers((work_handler(args.mode, args.work),))
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        sys.exit("could not bind 127.0.0.1:0")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set(SERVICE, serving)
    print(port, flush=True)

    stop = asyncio.Event()
    exit_when_stdin_closes(asyncio.get_running_loop(), stop)
    await stop.wait()
    await server.stop(grace=None)


if __name__ == "__main__":
    asyncio.run(main())
