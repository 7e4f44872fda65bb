#!/usr/bin/env bash
# Checks the deploy/ files: every YAML document parses; the DaemonSet has
# native gRPC probes on 50051 and a grace period longer than the drain; every
# kvtierd.toml (deploy/, the ConfigMap, cloud-init) parses as TOML and is
# accepted by `kvtierd --print-config`, also with its commented-out [blob]
# example uncommented; the Kubernetes replicated-cluster example (the
# ConfigMap's [cluster] table and the pod's KVTIER_CLUSTER_* variables,
# uncommented) is accepted and matches the ports and the gossip Service;
# cloud-init carries the systemd unit
# verbatim and its scripts are valid bash; `systemd-analyze verify` accepts
# the units (when systemd-analyze exists). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

py=python3
if ! "$py" -c 'import yaml' >/dev/null 2>&1 || ! "$py" -c 'import tomllib' >/dev/null 2>&1; then
  if [ ! -x .venv-deploy-check/bin/python ]; then
    echo "check-deploy: installing PyYAML into .venv-deploy-check"
    python3 -m venv .venv-deploy-check
    .venv-deploy-check/bin/pip install -q pyyaml tomli
  fi
  py=.venv-deploy-check/bin/python
fi

# Built when missing, and rebuilt when stale (a no-op when it is current),
# so the check runs the configuration code of this tree.
kvtierd=target/debug/kvtierd
if [ ! -x "$kvtierd" ] || command -v cargo >/dev/null 2>&1; then
  [ -x "$kvtierd" ] || echo "check-deploy: building kvtierd"
  cargo build -q -p kvtier-server --bin kvtierd
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/kvtier-deploy-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$py" - "$kvtierd" "$work" <<'PY'
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

kvtierd = str(pathlib.Path(sys.argv[1]).resolve())
work = pathlib.Path(sys.argv[2])
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)
    return ok


def kvtierd_accepts(text, name, expect, start=True):
    """Parses text as TOML and runs it through kvtierd --print-config."""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        check(False, f"{name}: TOML: {e}")
        return
    path = work / (name.replace("/", "_").replace(" ", "_") + ".toml")
    path.write_text(text)
    # No KVTIER_* from this shell may override the file.
    r = subprocess.run(
        [kvtierd, "--config", str(path), "--print-config"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    if not check(r.returncode == 0, f"{name}: kvtierd --print-config accepts it"):
        print(r.stderr.strip(), file=sys.stderr)
        return
    eff = tomllib.loads(r.stdout)
    for k, v in expect.items():
        check(eff.get(k) == v, f"{name}: effective {k} = {v!r} (got {eff.get(k)!r})")
    if not start:
        pass
    elif "manager" in eff:
        print(f"skip  {name}: not started ([manager] names its own directories)")
    else:
        starts(path, name)
    return eff


def blob_example_accepted(text, name):
    """The commented-out [blob] example of a kvtierd.toml, uncommented, is
    accepted by kvtierd --print-config (not started: it names a real
    storage account)."""
    lines = [l.strip() for l in text.splitlines()]
    if "# [blob]" not in lines:
        return
    block = []
    for l in lines[lines.index("# [blob]"):]:
        if not l.startswith("# "):
            break
        block.append(l[2:])
    eff = kvtierd_accepts(text + "\n" + "\n".join(block) + "\n", name + " with its [blob] example", {}, start=False)
    if eff is not None:
        blob = eff.get("blob", {})
        check(bool(blob.get("account")) and bool(blob.get("container")), f"{name}: the [blob] example names an account and a container")


def commented_block(text, head):
    """The commented-out block starting at the line `# {head}`, uncommented
    (up to the first line that is not a `# ` comment); None when absent."""
    lines = [l.strip() for l in text.splitlines()]
    if "# " + head not in lines:
        return None
    block = []
    for l in lines[lines.index("# " + head):]:
        if not l.startswith("# "):
            break
        block.append(l[2:].split("  #")[0].rstrip())
    return block


def cluster_example_accepted(text, name, env):
    """The commented-out [cluster] example of the ConfigMap, uncommented,
    with the pod's KVTIER_CLUSTER_* variables `env`, is accepted by kvtierd
    --print-config; answers its effective [cluster] table."""
    block = commented_block(text, "[cluster]")
    if not check(block is not None, f"{name}: a commented-out [cluster] example"):
        return {}
    path = work / (name.replace(" ", "_") + "-cluster.toml")
    path.write_text(text + "\n" + "\n".join(block) + "\n")
    r = subprocess.run(
        [kvtierd, "--config", str(path), "--print-config"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    if not check(r.returncode == 0, f"{name}: its [cluster] example with {sorted(env)} is accepted"):
        print(r.stderr.strip(), file=sys.stderr)
        return {}
    return tomllib.loads(r.stdout).get("cluster", {})


def starts(path, name):
    """Starts kvtierd on the file, with its addresses and data directory
    moved here, until it serves; then stops it with SIGTERM."""
    data = work / ("data-" + path.stem)
    env = {
        "PATH": "/usr/bin:/bin",
        "KVTIER_LISTEN": "127.0.0.1:0",
        "KVTIER_METRICS_LISTEN": "127.0.0.1:0",
        "KVTIER_DATA_DIR": str(data),
        "KVTIER_LOG": "warn",
    }
    p = subprocess.Popen(
        [kvtierd, "--config", str(path)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in p.stdout], daemon=True).start()
    deadline = time.monotonic() + 30
    served = False
    while not served and time.monotonic() < deadline and p.poll() is None:
        try:
            served = lines.get(timeout=0.2).startswith("kvtierd listening on ")
        except queue.Empty:
            pass
    if served:
        p.send_signal(signal.SIGTERM)
    else:
        p.kill()
    try:
        rc = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
    err = p.stderr.read().strip()
    if not check(served and rc == 0, f"{name}: kvtierd starts on it, serves, and stops on SIGTERM (served={served}, exit {rc})"):
        print(err, file=sys.stderr)


# Every YAML document under deploy/ parses.
docs = {}
for f in sorted(pathlib.Path("deploy").rglob("*")):
    if f.suffix not in (".yaml", ".yml"):
        continue
    try:
        docs[str(f)] = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        check(True, f"{f}: {len(docs[str(f)])} YAML document(s) parse")
    except yaml.YAMLError as e:
        check(False, f"{f}: YAML: {e}")

# deploy/kvtierd.toml, the commented example.
kvtierd_accepts(pathlib.Path("deploy/kvtierd.toml").read_text(), "deploy/kvtierd.toml", {})
blob_example_accepted(pathlib.Path("deploy/kvtierd.toml").read_text(), "deploy/kvtierd.toml")

# The Kubernetes manifests.
k8s = docs.get("deploy/kubernetes/kvtierd-daemonset.yaml", [])
by_kind = {}
for d in k8s:
    by_kind.setdefault(d.get("kind"), []).append(d)
for kind in ("Namespace", "ConfigMap", "DaemonSet"):
    check(len(by_kind.get(kind, [])) == 1, f"kubernetes: one {kind}")
services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
check(sorted(services) == ["kvtierd", "kvtierd-gossip"], "kubernetes: the Services kvtierd and kvtierd-gossip")

cfg = {}
cm_text = ""
for cm in by_kind.get("ConfigMap", []):
    text = cm.get("data", {}).get("kvtierd.toml")
    if check(text is not None, "kubernetes: the ConfigMap holds kvtierd.toml"):
        cfg = kvtierd_accepts(
            text,
            "ConfigMap kvtierd.toml",
            {"listen": "0.0.0.0:50051", "metrics_listen": "0.0.0.0:9464", "data_dir": "/var/lib/kvtier"},
        ) or {}
        blob_example_accepted(text, "ConfigMap kvtierd.toml")
        cm_text = text

for ds in by_kind.get("DaemonSet", []):
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    containers = [c for c in spec.get("containers", []) if c.get("name") == "kvtierd"]
    if not check(len(containers) == 1, "DaemonSet: a kvtierd container"):
        continue
    c = containers[0]
    for probe in ("readinessProbe", "livenessProbe"):
        p = c.get(probe, {})
        check(
            isinstance(p.get("grpc"), dict) and p["grpc"].get("port") == 50051,
            f"DaemonSet: {probe} is a native gRPC probe on 50051",
        )
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
    check(ports.get("grpc") == 50051, "DaemonSet: grpc port 50051")
    check(ports.get("metrics") == 9464, "DaemonSet: metrics port 9464")
    ann = pod.get("metadata", {}).get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true", "DaemonSet: prometheus.io/scrape")
    check(ann.get("prometheus.io/port") == "9464", "DaemonSet: prometheus.io/port is the metrics port")
    drain = cfg.get("drain_timeout_s", 10)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    check(grace > 2 * drain, f"DaemonSet: terminationGracePeriodSeconds {grace} > 2 x drain_timeout_s {drain}")
    check("resources" in c and "requests" in c["resources"], "DaemonSet: resource requests")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    data = vols.get(mounts.get(cfg.get("data_dir", "/var/lib/kvtier")), {})
    check("hostPath" in data, "DaemonSet: data_dir is a hostPath volume")
    env = {e["name"]: e for e in c.get("env", [])}
    tok = env.get("KVTIER_AUTH_TOKEN_FILE", {}).get("value", "")
    secret_mounts = [p for p, n in mounts.items() if "secret" in vols.get(n, {})]
    check(
        any(tok.startswith(p.rstrip("/") + "/") for p in secret_mounts),
        "DaemonSet: KVTIER_AUTH_TOKEN_FILE lies in a mounted Secret",
    )
    cm_mount = [m for m in c.get("volumeMounts", []) if "configMap" in vols.get(m["name"], {})]
    args = c.get("args", []) + c.get("command", [])
    check(
        any(m["mountPath"] in args for m in cm_mount),
        "DaemonSet: kvtierd is given the ConfigMap's kvtierd.toml",
    )
    labels = pod.get("metadata", {}).get("labels", {})
    for svc in by_kind.get("Service", []):
        n = svc["metadata"]["name"]
        check(svc["spec"].get("clusterIP") == "None", f"Service {n}: headless")
        sel = svc["spec"].get("selector", {})
        check(sel and all(labels.get(k) == v for k, v in sel.items()), f"Service {n}: selects the DaemonSet's pods")

    # The replicated-cluster example: the pod's commented-out variables
    # and the ConfigMap's [cluster] table, uncommented, make a gossip
    # member at its pod IP whose gossip port the pod and the Service open
    # and whose seed is the Service.
    raw = pathlib.Path("deploy/kubernetes/kvtierd-daemonset.yaml").read_text()
    # The comment's own indentation kept: YAML needs it.
    raw_lines = raw.splitlines()
    start = next((i for i, l in enumerate(raw_lines) if l.strip() == "# - name: NODE_NAME"), None)
    env_lines = []
    if start is not None:
        col = raw_lines[start].index("#")
        for l in raw_lines[start:]:
            body = l[col + 2:]
            if not l.startswith(" " * col + "# ") or not body.startswith(("- ", "  ")):
                break
            env_lines.append(body)
    pod_env = yaml.safe_load("\n".join(env_lines)) or []
    names = [e.get("name") for e in pod_env]
    check(
        names == ["NODE_NAME", "POD_IP", "KVTIER_CLUSTER_NODE_ID", "KVTIER_CLUSTER_ADDR"],
        f"DaemonSet: the commented-out cluster variables ({names})",
    )
    field = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in pod_env}
    check(field.get("NODE_NAME") == "spec.nodeName" and field.get("POD_IP") == "status.podIP", "DaemonSet: NODE_NAME and POD_IP from the downward API")
    # What Kubernetes substitutes for $(NODE_NAME) and $(POD_IP).
    subst = {"NODE_NAME": "aks-gpu-12345-vmss000003", "POD_IP": "10.244.3.17"}
    env_k = {}
    for e in pod_env:
        if "value" in e:
            v = e["value"]
            for k, x in subst.items():
                v = v.replace(f"$({k})", x)
            env_k[e["name"]] = v
    cl = cluster_example_accepted(cm_text, "ConfigMap kvtierd.toml", env_k)
    if cl:
        check(cl.get("membership") == "gossip", "cluster example: gossip membership")
        check(
            cl.get("node_id") == subst["NODE_NAME"]
            and {"id": subst["NODE_NAME"], "addr": subst["POD_IP"] + ":50051"} in [
                {"id": m.get("id"), "addr": m.get("addr")} for m in cl.get("members", [])
            ],
            "cluster example: the pod is the member named after its node, at its pod IP",
        )
        gport = cl.get("gossip_port")
        dports = {(p.get("protocol"), p.get("containerPort")) for p in c.get("ports", [])}
        check({("UDP", gport), ("TCP", gport)} <= dports, f"DaemonSet: gossip port {gport} open for UDP and TCP")
        gsvc = services.get("kvtierd-gossip", {}).get("spec", {})
        check(gsvc.get("publishNotReadyAddresses") is True, "Service kvtierd-gossip: lists pods before they are ready")
        sports = {(p.get("protocol"), p.get("port")) for p in gsvc.get("ports", [])}
        check({("UDP", gport), ("TCP", gport)} <= sports, f"Service kvtierd-gossip: port {gport}, UDP and TCP")
        ns = ds["metadata"]["namespace"]
        check(
            any(s.startswith(f"kvtierd-gossip.{ns}.svc") and s.endswith(f":{gport}") for s in cl.get("seeds", [])),
            "cluster example: the seed is the kvtierd-gossip Service on the gossip port",
        )

# cloud-init.
ci_path = pathlib.Path("deploy/cloud-init/kvtierd.yaml")
ci_docs = docs.get(str(ci_path), [])
check(ci_path.read_text().startswith("#cloud-config\n"), "cloud-init: starts with #cloud-config")
if check(len(ci_docs) == 1, "cloud-init: one document"):
    files = {f["path"]: f for f in ci_docs[0].get("write_files", [])}
    text = files.get("/etc/kvtier/kvtierd.toml", {}).get("content")
    if check(text is not None, "cloud-init: writes /etc/kvtier/kvtierd.toml"):
        kvtierd_accepts(text, "cloud-init kvtierd.toml", {"data_dir": "/var/lib/kvtier"})
    unit = files.get("/etc/systemd/system/kvtierd.service", {}).get("content")
    check(
        unit == pathlib.Path("deploy/systemd/kvtierd.service").read_text(),
        "cloud-init: carries deploy/systemd/kvtierd.service verbatim",
    )
    units = work / "units"
    units.mkdir()
    for path, f in files.items():
        content = f.get("content", "")
        if content.startswith("#!/bin/bash"):
            r = subprocess.run(["bash", "-n"], input=content, capture_output=True, text=True)
            check(r.returncode == 0, f"cloud-init: {path} is valid bash" + (f": {r.stderr.strip()}" if r.stderr.strip() else ""))
            (units / pathlib.Path(path).name).write_text(content)
            (units / pathlib.Path(path).name).chmod(0o755)
        elif path.endswith(".service") and path != "/etc/systemd/system/kvtierd.service":
            (units / pathlib.Path(path).name).write_text(content)
    runcmd = " ".join(" ".join(c) if isinstance(c, list) else c for c in ci_docs[0].get("runcmd", []))
    check("kvtierd.service" in runcmd and "enable" in runcmd, "cloud-init: enables kvtierd.service")
    check(
        any(u.get("name") == "kvtier" for u in ci_docs[0].get("users", []) if isinstance(u, dict)),
        "cloud-init: creates the kvtier user",
    )

if failures:
    print(f"check-deploy: {len(failures)} failure(s)", file=sys.stderr)
    sys.exit(1)
PY

# systemd units, with ExecStart pointing at files that exist here.
if command -v systemd-analyze >/dev/null 2>&1; then
  units="$work/units"
  mkdir -p "$units"
  bin=$(cd "$(dirname "$kvtierd")" && pwd)/$(basename "$kvtierd")
  sed "s|^ExecStart=/usr/local/bin/kvtierd|ExecStart=$bin|" deploy/systemd/kvtierd.service >"$units/kvtierd.service"
  to_verify=("$units/kvtierd.service")
  if [ -f "$units/kvtier-nvme.service" ]; then
    sed -i "s|^ExecStart=/usr/local/sbin/|ExecStart=$units/|" "$units/kvtier-nvme.service"
    to_verify+=("$units/kvtier-nvme.service")
  fi
  # Fail on an error, or on any complaint about these units (others' noise,
  # e.g. about units of the machine that runs this, is only shown).
  if out=$(systemd-analyze verify "${to_verify[@]}" 2>&1) && ! grep -q -e kvtierd -e kvtier-nvme <<<"$out"; then
    [ -z "$out" ] || echo "$out" >&2
    echo "ok    systemd-analyze verify: ${to_verify[*]##*/}"
  else
    echo "$out" >&2
    echo "FAIL  systemd-analyze verify" >&2
    exit 1
  fi
else
  echo "skip  systemd-analyze verify: systemd-analyze not installed"
fi
echo "check-deploy: ok"
