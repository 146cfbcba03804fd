"""``curvlt submit`` — send a run or sweep to a remote Ray cluster through the Ray Jobs API
(SPEC §8), and follow, inspect or stop it.

    curvlt submit --address http://HEAD:8265 [--working-dir .] [--pip PKG ...] [--env K=V ...] -- curvlt tune cifar_lt
    curvlt submit --address http://HEAD:8265 --status JOB_ID | --logs JOB_ID [--follow] | --stop JOB_ID
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import time

from orchestrator.errors import UserError
from orchestrator.tracking import redact

#: How the Jobs API says that the head's job agent is not up yet, and how long to wait for it (s).
NO_AGENT, AGENT_WAIT_S = "No available agent to submit job", 60

#: Never uploaded with --working-dir: environments, run outputs and local stores.
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "curvlt_runs/", "curvlt_compare/", "mlflow.db", "mlartifacts/", "mlruns/",
                        "__pycache__/", "*.egg-info/"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("submit", help="submit a curvlt command to a remote Ray cluster (Ray Jobs API)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's dashboard/Jobs address (default: $RAY_API_SERVER_ADDRESS or %(default)s)")
    parser.add_argument("--working-dir", help="folder uploaded as the job's working directory")
    parser.add_argument("--pip", nargs="+", default=[], help="pip requirements installed for the job, e.g. curvlt")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the job, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", metavar="JOB_ID", help="print a job's status")
    action.add_argument("--logs", metavar="JOB_ID", help="print a job's logs")
    action.add_argument("--stop", metavar="JOB_ID", help="stop a job")
    parser.add_argument("--follow", action="store_true", help="with --logs: stream until the job ends")
    parser.add_argument("--wait", action="store_true", help="after submitting: stream the logs until the job ends")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="after --: the command to run, e.g. curvlt tune X")
    parser.set_defaults(run=run)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    from orchestrator.ray_env import check_something_answers  # imports Ray, which the other commands need not

    check_something_answers(address, "--address ")  # a GCS host:port: Ray waits 45 s on one that is down
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # connection errors come in several types
        raise UserError(f"--address: cannot reach the Ray Jobs API at {redact(address)} ({str(exc).splitlines()[0]})")


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--env {pair}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        env[key] = value
    return env


def _submit(client, entrypoint: str, runtime_env: dict | None) -> str:
    """``client.submit_job``, tried again while the head has no job agent yet. A head just started
    (``ray start --head``) answers its Jobs API before the agent that runs jobs is up, and refuses
    with "No available agent to submit job, please try again later" (Ray 2.60)."""
    deadline = time.monotonic() + AGENT_WAIT_S
    announced = False
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as exc:
            if NO_AGENT not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise UserError(f"--address: the cluster has had no job agent for {AGENT_WAIT_S} s "
                                f"({str(exc).splitlines()[0]})") from None
        if not announced:
            print(f"[curvlt] the cluster's job agent is not up yet; trying again for up to {AGENT_WAIT_S} s",
                  flush=True)
            announced = True
        time.sleep(2.0)


def _stream(client, job_id: str) -> str:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client.get_job_status(job_id))


def _request(args: argparse.Namespace) -> tuple[list[str], dict | None]:
    """The command and runtime environment of a submission, checked here before the cluster is
    contacted."""
    command = [part for part in args.entrypoint if part != "--"]
    if not command:
        raise UserError("submit: give the command to run after --, e.g. curvlt submit --address A -- curvlt tune X")
    runtime_env: dict = {}
    if args.working_dir:
        if not os.path.isdir(args.working_dir):
            raise UserError(f"--working-dir {args.working_dir}: no such folder")
        runtime_env.update(working_dir=args.working_dir, excludes=WORKING_DIR_EXCLUDES)
    if args.pip:
        runtime_env["pip"] = args.pip
    if args.env:
        runtime_env["env_vars"] = _env(args.env)
    return command, runtime_env or None


def run(args: argparse.Namespace) -> int:
    if args.follow and not args.logs:
        raise UserError("--follow: only with --logs JOB_ID (after submitting, --wait streams the logs)")
    submitting = not (args.status or args.stop or args.logs)
    if submitting:
        command, runtime_env = _request(args)
    elif args.entrypoint or args.wait:
        raise UserError("submit: --status, --logs and --stop take no command and no --wait")
    client = _client(args.address)
    if args.status:
        print(client.get_job_status(args.status))
        return 0
    if args.stop:
        print(f"stop requested: {client.stop_job(args.stop)}")
        return 0
    if args.logs:
        if args.follow:
            print(f"\n[curvlt] job {args.logs}: {_stream(client, args.logs)}")
        else:
            print(client.get_job_logs(args.logs), end="")
        return 0
    job_id = _submit(client, shlex.join(command), runtime_env)
    address = redact(args.address)
    print(f"submitted job {job_id} to {address}: {shlex.join(command)}")
    print(f"follow it:  curvlt submit --address {address} --logs {job_id} --follow")
    print(f"status:     curvlt submit --address {address} --status {job_id}")
    print(f"stop it:    curvlt submit --address {address} --stop {job_id}")
    if args.wait:
        status = _stream(client, job_id)
        print(f"\n[curvlt] job {job_id}: {status}")
        return 0 if status.endswith("SUCCEEDED") else 1
    return 0
