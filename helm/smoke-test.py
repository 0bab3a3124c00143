#!/usr/bin/env python3
"""Runs what the chart renders as three local `chime serve` processes, short of a cluster.

    python3 helm/smoke-test.py CHIME_BINARY MYSQL_SERVER_URL

The chart is rendered with `helm template` (release `t`, namespace `ns`, three replicas, the
database URL given). Each pod's environment is taken from the rendered StatefulSet with
the field references filled in as the kubelet would: the pod name as node id, and a
loopback address of its own (127.0.0.11, .12, .13) as pod IP. The pods' DNS names (the
gossip seeds) are mapped to those addresses in /etc/hosts. The only change to the
rendered environment is that each process listens on its own pod IP instead of every
interface, since the three share one host. Passes when every node reports three ready
members holding all the slots the ring gives them, and a job written through one node is
read back through another.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import yaml

HOSTS_MARK = "# chime helm smoke test"


def render(db_url):
    out = subprocess.run(
        ["helm", "template", "t", os.path.join(os.path.dirname(__file__), "chime"),
         "--namespace", "ns", "--set", f"database.url={db_url}", "--set", "replicas=3"],
        check=True, capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    secret = next(d for d in docs if d["kind"] == "Secret")
    return sts, secret


def pod_env(sts, secret, index, ip):
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            env[e["name"]] = {"metadata.name": f"t-chime-{index}", "status.podIP": ip}[path]
        elif "secretKeyRef" in src:
            env[e["name"]] = secret["stringData"][src["secretKeyRef"]["key"]]
    http_port = env["CHIME_HTTP_ADDR"].lstrip(":")
    gossip_port = env["CHIME_GOSSIP_ADDR"].lstrip(":")
    env["CHIME_HTTP_ADDR"] = f"{ip}:{http_port}"
    env["CHIME_GOSSIP_ADDR"] = f"{ip}:{gossip_port}"
    env["CHIME_LOG_FORMAT"] = "text"
    return env, container["args"], f"http://{ip}:{http_port}"


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def main():
    binary, server = sys.argv[1], sys.argv[2].rstrip("/")
    db = f"chime_helm_smoke_{os.getpid()}"
    subprocess.run(["mysql", "--protocol=socket", "-uroot", "-e", f"CREATE DATABASE {db}"], check=True)
    sts, secret = render(f"{server}/{db}")
    ips = [f"127.0.0.{11 + i}" for i in range(3)]
    with open("/etc/hosts") as f:
        hosts = [l for l in f.read().splitlines() if HOSTS_MARK not in l]
    hosts += [f"{ip} t-chime-{i}.t-chime-gossip.ns.svc {HOSTS_MARK}" for i, ip in enumerate(ips)]
    with open("/etc/hosts", "w") as f:
        f.write("\n".join(hosts) + "\n")
    procs, bases = [], []
    try:
        for i, ip in enumerate(ips):
            env, args, base = pod_env(sts, secret, i, ip)
            clean = {k: v for k, v in os.environ.items() if not k.startswith("CHIME_")}
            procs.append(subprocess.Popen([binary, *args], env={**clean, **env},
                                          stdout=subprocess.DEVNULL,
                                          stderr=open(f"/tmp/chime-helm-smoke-{i}.log", "w")))
            bases.append(base)
        deadline = time.time() + 90
        while True:
            try:
                views = [get(f"{b}/v1/cluster") for b in bases]
                ok = all(
                    len(v["members"]) == 3
                    and all(m["state"] == "ready" and m["leased_slots"] == m["ring_slots"] > 0
                            for m in v["members"])
                    for v in views)
            except Exception:
                ok = False
            if ok:
                break
            if time.time() > deadline:
                sys.exit(f"the three nodes did not converge in 90 s; logs in /tmp/chime-helm-smoke-*.log")
            time.sleep(1)
        req = urllib.request.Request(
            f"{bases[0]}/v1/jobs/smoke", method="PUT",
            data=json.dumps({"schedule": "@hourly",
                             "callback": {"http": {"url": "http://127.0.0.1:9/hook"}}}).encode(),
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201, r.status
        job = get(f"{bases[2]}/v1/jobs/smoke")
        assert job["id"] == "smoke", job
        print(f"ok: 3 nodes from the rendered chart converged; job owned by {job['owner']}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        with open("/etc/hosts") as f:
            kept = [l for l in f.read().splitlines() if HOSTS_MARK not in l]
        with open("/etc/hosts", "w") as f:
            f.write("\n".join(kept) + "\n")
        subprocess.run(["mysql", "--protocol=socket", "-uroot", "-e", f"DROP DATABASE {db}"])


if __name__ == "__main__":
    main()
