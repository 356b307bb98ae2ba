#!/usr/bin/env python3
"""`sacct` stand-in for the test cluster of scripts/slurm/start.sh (no slurmdbd).

Without slurmdbd the real `sacct` fails, submitit's SlurmInfoWatcher keeps the
state "UNKNOWN" (which it counts as not finished) and a job that died before
writing its result pickle is waited on forever. start.sh installs this file as
<state_dir>/bin/sacct and env.sh puts that dir first on PATH.

It answers the subset of sacct that submitit 1.5 uses
    sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
from `squeue -r -t all` (slurmctld keeps finished jobs for MinJobAge=3600 s)
and `scontrol show job` (ExitCode only). Job ids are expanded to all tasks of
an array job, like sacct does. A job id slurmctld no longer knows is reported
FAILED, so a waiter never hangs on it (a job whose result exists is already
"done" for submitit without asking). Transient states sacct never shows
(CONFIGURING, ...) are mapped to RUNNING; a job held after a failed launch
("launch failed requeued held", e.g. a spool path too long for its sockets)
is reported FAILED as it never runs by itself. Other options are accepted and
ignored; only one line per job (no .batch/.0 steps) is printed.
Exit status 1 (with squeue's message) when slurmctld cannot be reached.
"""
import subprocess
import sys

# canonical sacct field name -> squeue format code ("" = answered otherwise)
FIELDS = {
    "jobid": ("JobID", "%i"),
    "jobidraw": ("JobIDRaw", "%A"),
    "state": ("State", "%T"),
    "nodelist": ("NodeList", "%N"),
    "jobname": ("JobName", "%j"),
    "partition": ("Partition", "%P"),
    "user": ("User", "%u"),
    "elapsed": ("Elapsed", "%M"),
    "start": ("Start", "%S"),
    "end": ("End", "%e"),
    "alloccpus": ("AllocCPUS", "%C"),
    "nnodes": ("NNodes", "%D"),
    "reason": ("Reason", "%r"),
    "exitcode": ("ExitCode", ""),
}
STATE_MAP = {
    "CONFIGURING": "RUNNING",
    "SIGNALING": "RUNNING",
    "STAGE_OUT": "RUNNING",
    "RESIZING": "RUNNING",
    "REQUEUE_HOLD": "REQUEUED",
    "REQUEUE_FED": "REQUEUED",
}
ARG_OPTS = {  # options that take a value (ignored apart from -j/-o)
    "-A", "--accounts", "-E", "--endtime", "-S", "--starttime", "-s", "--state",
    "-u", "--user", "-M", "--clusters", "-r", "--partition", "-N", "--nodelist",
    "-i", "--nnodes", "-k", "--timelimit-min", "-K", "--timelimit-max",
    "--name", "-q", "--qos", "-W", "--wckeys", "-x", "--associations",
    "-g", "--gid", "--group", "-f", "--file", "-T", "--truncate", "--delimiter",
}
SEP = "|"


def parse(argv):
    jobs, fmt = [], "JobID,JobName,Partition,State,ExitCode"
    parsable, trailing, header = False, False, True
    i = 0
    while i < len(argv):
        a = argv[i]
        key, eq, val = a.partition("=")
        if key in ("-j", "--jobs"):
            if not eq:
                i += 1
                val = argv[i]
            jobs += [j for j in val.split(",") if j]
        elif key in ("-o", "--format"):
            if not eq:
                i += 1
                val = argv[i]
            fmt = val
        elif a in ("-P", "--parsable2"):
            parsable = True
        elif a in ("-p", "--parsable"):
            parsable, trailing = True, True
        elif a in ("-n", "--noheader"):
            header = False
        elif key in ARG_OPTS and not eq:
            i += 1
        i += 1
    fields = []
    for f in fmt.split(","):
        name = f.split("%")[0].strip()
        if name:
            fields.append(FIELDS.get(name.lower(), (name, "")))
    return jobs, fields, parsable, trailing, header


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p.returncode, p.stdout, p.stderr


def exit_codes(job):
    """{job id as squeue %i prints it: ExitCode} from scontrol (best effort)."""
    rc, out, _ = run(["scontrol", "-o", "show", "job", job])
    codes = {}
    if rc != 0:
        return codes
    for line in out.splitlines():
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        jid = kv.get("JobId", "")
        if kv.get("ArrayTaskId") and kv.get("ArrayJobId"):
            jid = f"{kv['ArrayJobId']}_{kv['ArrayTaskId']}"
        codes[jid] = kv.get("ExitCode", "")
    return codes


def main(argv):
    jobs, fields, parsable, trailing, header = parse(argv)
    codes = [c for _, c in fields if c]
    squeue_fmt = SEP.join(["%i", "%T", "%r"] + codes)
    want_exit = any(name == "ExitCode" for name, _ in fields)
    rows = []
    for job in jobs or [None]:
        cmd = ["squeue", "-h", "-r", "-t", "all", "-o", squeue_fmt]
        if job is not None:
            cmd += ["-j", job]
        rc, out, err = run(cmd)
        if rc != 0:
            if job is not None and "Invalid job id" in err:
                # purged from slurmctld (or never existed): finished, no result
                values = {"%i": job, "%A": job.split("_")[0], "%T": "FAILED", "%N": "None assigned"}
                rows.append(({n: values.get(c, "") for n, c in fields}, job))
                continue
            sys.stderr.write(err or f"sacct shim: squeue exited with {rc}\n")
            return 1
        ex = exit_codes(job) if (want_exit and job is not None) else {}
        for line in out.splitlines():
            parts = line.split(SEP)
            if len(parts) < 3 + len(codes):
                continue
            jid, state, reason = parts[0], parts[1], parts[2]
            values = dict(zip(codes, parts[3:]))
            state = STATE_MAP.get(state, state)
            if state == "PENDING" and reason.startswith("launch failed"):
                # "launch failed requeued held": held by the system, never runs
                state = "FAILED"
            values["%i"], values["%T"] = jid, state
            if not values.get("%N") and "%N" in values:
                values["%N"] = "None assigned"
            row = {n: values.get(c, "") for n, c in fields}
            if "ExitCode" in row:
                row["ExitCode"] = ex.get(jid, "")
            rows.append((row, jid))
    names = [n for n, _ in fields]
    end = SEP if trailing else ""
    lines = []
    if header:
        lines.append(SEP.join(names) + end if parsable else " ".join(f"{n:>12}" for n in names))
    seen = set()
    for row, jid in rows:
        if jid in seen:
            continue
        seen.add(jid)
        vals = [row[n] for n in names]
        lines.append(SEP.join(vals) + end if parsable else " ".join(f"{v:>12}" for v in vals))
    if lines:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
