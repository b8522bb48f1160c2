"""The checks of deploy/validate.sh that no off-the-shelf validator makes: the
ServiceMonitor (a CRD, which no bundled schema covers), the Dockerfile's structure, the
systemd unit's structure, and the cross-checks between the artefacts and the service
(ports, probe paths, stop deadlines, users, secret references) that fail on drift.

    python3 deploy/validate.py checks                # every check below; exit 1 on any failure
    python3 deploy/validate.py check-config BINARY   # the ConfigMap's configuration through
                                                     # `BINARY check-config`, secrets stubbed

Needs PyYAML and dockerfile-parse (and tomli before Python 3.11): validate.sh installs
them under target/deploy-python.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
UNIT = ROOT / "deploy" / "systemd" / "crm-sync.service"
REFERENCE = ROOT / "config" / "crm-sync.toml"
CONFIG_RS = ROOT / "src" / "config.rs"

# After service.shutdown_deadline_ms, a stopping crm-sync allows itself up to 3 s for
# librdkafka's close and 3 s for the gRPC server (src/pipeline.rs, ServiceHandle::stop),
# then 5 s for the notifier (src/main.rs, NOTIFIER_STOP): 11 s. The kubelet's grace period
# and systemd's TimeoutStopSec must cover the deadline plus that, with room to spare.
STOP_MARGIN_MS = 15_000

LIVE_PATH = "/health/live"
READY_PATH = "/health/ready"
METRICS_PATH = "/metrics"
TEMPLATE_PLACEHOLDER = "REPLACE-ME"
# The line of config/crm-sync.toml that deploy/Dockerfile rewrites to 0.0.0.0.
REFERENCE_HTTP_LINE = 'http_addr = "127.0.0.1:9464"'

failures = []


def check(ok, what, detail=""):
    """Records one check: prints `ok` or `FAIL` with what it checks."""
    if ok:
        print(f"ok    {what}")
    else:
        failures.append(what)
        print(f"FAIL  {what}" + (f": {detail}" if detail else ""))
    return ok


def die(message):
    print(f"FAIL  {message}")
    sys.exit(1)


# ---- the service's own defaults ----------------------------------------------------------


def rust_default(name, pattern):
    """The value returned by `fn NAME()` in src/config.rs (defaults of absent keys)."""
    text = CONFIG_RS.read_text()
    m = re.search(r"fn " + name + r"\(\)\s*->\s*[\w:]+\s*\{\s*" + pattern + r"\s*\}", text)
    if not m:
        die(f"src/config.rs: cannot find `fn {name}()`; update deploy/validate.py")
    return m.group(1)


DEFAULT_SHUTDOWN_DEADLINE_MS = int(rust_default("default_shutdown_deadline_ms", r"([0-9_]+)").replace("_", ""))
DEFAULT_HTTP_ADDR = rust_default("default_http_addr", r'"([^"]+)"\.into\(\)')


def service_settings(config):
    service = config.get("service", {})
    return (
        service.get("http_addr", DEFAULT_HTTP_ADDR),
        int(service.get("shutdown_deadline_ms", DEFAULT_SHUTDOWN_DEADLINE_MS)),
    )


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host):
    return host == "localhost" or host.startswith("127.") or host == "::1"


# ---- Kubernetes --------------------------------------------------------------------------


def load_manifests():
    """Every YAML document under deploy/kubernetes, by file name."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            check(False, f"{path.name} parses as YAML", str(e))
            continue
        if check(bool(loaded) and all(isinstance(d, dict) and d.get("apiVersion") and d.get("kind") for d in loaded),
                 f"{path.name} parses as YAML, with apiVersion and kind"):
            docs[path.name] = loaded
    return docs


def one(docs, kind):
    found = [(name, d) for name, ds in docs.items() for d in ds if isinstance(d, dict) and d.get("kind") == kind]
    if len(found) != 1:
        die(f"deploy/kubernetes: expected exactly one {kind}, found {len(found)}")
    return found[0][1]


def subset(small, big):
    return bool(small) and all(big.get(k) == v for k, v in small.items())


def container_port(container, port):
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def timespan_ms(text):
    """A systemd time span ("45", "45s", "1min 30s", "500ms") in milliseconds."""
    units = {"us": 0.001, "usec": 0.001, "ms": 1, "msec": 1, "": 1000, "s": 1000, "sec": 1000,
             "m": 60_000, "min": 60_000, "h": 3_600_000, "hr": 3_600_000, "d": 86_400_000}
    text = text.strip()
    if text == "infinity":
        return float("inf")
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*([0-9.]+)\s*([a-z]*)", text):
        if m.start() != pos or m.group(2) not in units:
            raise ValueError(f"not a time span: {text!r}")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"not a time span: {text!r}")
    return total


def references(value, path=""):
    """(key path, reference) of every "${...}" string in the configuration."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from references(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from references(v, f"{path}[{i}]")
    elif isinstance(value, str):
        m = re.fullmatch(r"\$\{(.+)\}", value)
        if m:
            yield path, m.group(1)


SECRET_KEY = re.compile(
    r"(password|secret|token|client_id|secrets\[\d+\]|tenant_tokens\.[^.]+|ssl\.key\.pem|sasl\.oauthbearer\.config)$")


def secret_values(value, path=""):
    """(key path, value) of every key that holds a secret."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from secret_values(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from secret_values(v, f"{path}[{i}]")
    elif SECRET_KEY.search(path) and not path.endswith("sasl.username"):
        yield path, value


def check_kubernetes(docs):
    deployment = one(docs, "Deployment")
    configmap = one(docs, "ConfigMap")
    service = one(docs, "Service")
    pdb = one(docs, "PodDisruptionBudget")
    monitor = one(docs, "ServiceMonitor")
    secret = one(docs, "Secret")
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    containers = [c for c in pod["containers"] if c["name"] == "crm-sync"]
    if len(containers) != 1:
        die("deployment.yaml: expected one container named crm-sync")
    container = containers[0]

    # The configuration the pods run: the ConfigMap mounted at the path of --config.
    args = container.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args else "/etc/crm-sync/crm-sync.toml"
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mount = mounts.get(os.path.dirname(config_path))
    cm_volume = volumes.get(mount["name"]) if mount else None
    check(
        cm_volume is not None
        and cm_volume.get("configMap", {}).get("name") == configmap["metadata"]["name"]
        and os.path.basename(config_path) in configmap.get("data", {}),
        f"the Deployment's --config {config_path} is a key of the ConfigMap {configmap['metadata']['name']} mounted there",
    )
    toml_text = configmap.get("data", {}).get(os.path.basename(config_path), "")
    try:
        config = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as e:
        die(f"configmap.yaml: {os.path.basename(config_path)} is not valid TOML: {e}")
    check(True, "configmap.yaml: the configuration parses as TOML")
    http_addr, deadline_ms = service_settings(config)
    http_host, http_port = split_addr(http_addr)
    print(f"      (ConfigMap: service.http_addr = {http_addr}, service.shutdown_deadline_ms = {deadline_ms}"
          f"{'' if 'shutdown_deadline_ms' in config.get('service', {}) else ' (the default, from src/config.rs)'})")

    # The stop deadline.
    grace_s = pod.get("terminationGracePeriodSeconds", 30)
    check(
        grace_s * 1000 > deadline_ms and grace_s * 1000 >= deadline_ms + STOP_MARGIN_MS,
        f"terminationGracePeriodSeconds ({grace_s} s) is above service.shutdown_deadline_ms ({deadline_ms} ms) "
        f"by at least {STOP_MARGIN_MS // 1000} s",
        f"{grace_s * 1000} ms < {deadline_ms} + {STOP_MARGIN_MS} ms: the kubelet would SIGKILL a member still draining",
    )

    # Kafka over TLS needs librdkafka built with OpenSSL: rdkafka's `ssl` or `ssl-vendored`
    # feature (`gssapi` implies `ssl`). Without it the service refuses to start ("OpenSSL
    # not available at build time"), which check-config does not see.
    protocol = str(config.get("kafka", {}).get("client", {}).get("security.protocol", "plaintext")).upper()
    rdkafka = tomllib.loads((ROOT / "Cargo.toml").read_text())["dependencies"]["rdkafka"]
    features = set(rdkafka.get("features", [])) if isinstance(rdkafka, dict) else set()
    if "SSL" in protocol:
        check(bool(features & {"ssl", "ssl-vendored", "gssapi", "gssapi-vendored"}),
              f"kafka.client security.protocol = {protocol}: Cargo.toml builds rdkafka with OpenSSL",
              f"rdkafka features {sorted(features)}: the service would refuse to start")

    # Ports and probes.
    check(not is_loopback(http_host), f"service.http_addr ({http_addr}) is not loopback (probes and scrapes reach the pod's IP)")
    ports = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
    check(http_port in ports, f"service.http_addr's port {http_port} is a container port", f"container ports: {sorted(ports)}")
    for probe, path in (("livenessProbe", LIVE_PATH), ("readinessProbe", READY_PATH)):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, f"{probe} is GET {path}", f"it is {get.get('path')!r}")
        port = container_port(container, get.get("port"))
        check(port == http_port, f"{probe}'s port ({get.get('port')} = {port}) is service.http_addr's port {http_port}")
    grpc = config.get("grpc")
    grpc_port = None
    if grpc is not None:
        grpc_host, grpc_port = split_addr(grpc["addr"])
        check(not is_loopback(grpc_host), f"grpc.addr ({grpc['addr']}) is not loopback")
        check(grpc_port in ports, f"grpc.addr's port {grpc_port} is a container port", f"container ports: {sorted(ports)}")

    # The Service, the ServiceMonitor and the PDB select the pods and ports they mean.
    check(subset(service["spec"].get("selector", {}), pod_labels), "the Service's selector matches the pod labels")
    service_ports = {p["name"]: container_port(container, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]}
    check(http_port in service_ports.values(), f"the Service exposes the metrics port {http_port}", str(service_ports))
    if grpc_port is not None:
        check(grpc_port in service_ports.values(), f"the Service exposes the gRPC port {grpc_port}", str(service_ports))
    check(
        subset(pdb["spec"].get("selector", {}).get("matchLabels", {}), pod_labels) and pdb["spec"].get("maxUnavailable") == 1,
        "the PodDisruptionBudget selects the pods, maxUnavailable 1",
    )

    # The ServiceMonitor is a CRD (monitoring.coreos.com/v1): no schema is bundled for it,
    # so its shape is checked here.
    endpoints = monitor.get("spec", {}).get("endpoints")
    check(
        monitor.get("apiVersion") == "monitoring.coreos.com/v1" and isinstance(endpoints, list) and endpoints,
        "servicemonitor.yaml: apiVersion monitoring.coreos.com/v1, kind ServiceMonitor, spec.endpoints (CRD: checked "
        "here, not against a schema)",
    )
    check(
        subset(monitor["spec"].get("selector", {}).get("matchLabels", {}), service["metadata"].get("labels", {})),
        "the ServiceMonitor's selector matches the Service's labels",
    )
    for ep in endpoints or []:
        check(
            service_ports.get(ep.get("port")) == http_port and ep.get("path", METRICS_PATH) == METRICS_PATH,
            f"the ServiceMonitor scrapes {METRICS_PATH} on the Service port {ep.get('port')!r} (= {http_port})",
        )

    # Security context and resources.
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    check(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, "runAsNonRoot")
    check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    check("ALL" in sc.get("capabilities", {}).get("drop", []), "capabilities: drop ALL")
    res = container.get("resources", {})
    check(
        all(k in res.get(kind, {}) for kind in ("requests", "limits") for k in ("cpu", "memory")),
        "resources: cpu and memory requests and limits",
    )

    # Secrets: every reference in the configuration reaches the container.
    secret_name = secret["metadata"]["name"]
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    env = {e["name"]: e for e in container.get("env", [])}
    used_keys = set()
    for path, ref in references(config):
        if ref.startswith("file:"):
            file = ref[len("file:"):]
            m = mounts.get(os.path.dirname(file))
            vol = volumes.get(m["name"], {}) if m else {}
            sec = vol.get("secret", {})
            items = {i["path"]: i["key"] for i in sec.get("items", [])}
            key = items.get(os.path.basename(file), os.path.basename(file)) if sec else None
            ok = sec.get("secretName") == secret_name and key in secret_keys
            check(ok, f"{path}: {file} is the key {key!r} of the Secret {secret_name} mounted there",
                  f"mounted: {sorted(mounts)}; keys: {sorted(secret_keys)}")
            used_keys.add(key)
        else:
            ref_from = env.get(ref, {}).get("valueFrom", {}).get("secretKeyRef", {})
            envfrom = any(e.get("secretRef", {}).get("name") == secret_name for e in container.get("envFrom", []))
            ok = (ref_from.get("name") == secret_name and ref_from.get("key") in secret_keys) or (envfrom and ref in secret_keys)
            check(ok, f"{path}: ${{{ref}}} is set from the Secret {secret_name} (secretKeyRef)",
                  f"env: {sorted(env)}; keys: {sorted(secret_keys)}")
            used_keys.add(ref_from.get("key", ref))
    written = [path for path, value in secret_values(config)
               if not (isinstance(value, str) and re.fullmatch(r"\$\{.+\}", value))]
    check(not written, f"no secret is written in the ConfigMap: all {len(list(secret_values(config)))} secret keys "
          "hold references", f"written: {', '.join(written)}")
    unused = sorted(secret_keys - used_keys)
    if unused:
        print(f"note  Secret keys no reference uses: {', '.join(unused)}")
    values = list(secret.get("stringData", {}).values()) + list(secret.get("data", {}).values())
    check(all(v == TEMPLATE_PLACEHOLDER for v in values),
          f"secret.example.yaml holds placeholders only ({TEMPLATE_PLACEHOLDER})")

    # The kustomization applies everything but the Secret template.
    kustomization = docs.get("kustomization.yaml", [{}])[0]
    resources = kustomization.get("resources", [])
    manifests = sorted(n for n in docs if n not in ("kustomization.yaml", "secret.example.yaml"))
    check(all((K8S / r).is_file() for r in resources), "kustomization.yaml: every resource exists")
    check(sorted(resources) == manifests, "kustomization.yaml lists every manifest", f"{sorted(resources)} != {manifests}")
    check("secret.example.yaml" not in resources, "kustomization.yaml does not apply the Secret template")
    image = container["image"].rsplit(":", 1)[0]
    check(any(i.get("name") == image for i in kustomization.get("images", [])),
          f"kustomization.yaml sets the image {image!r} of the Deployment")
    return pod, container, config, http_port, grpc_port


# ---- Dockerfile --------------------------------------------------------------------------


def check_dockerfile(pod, container, k8s_http_port, k8s_grpc_port, reference):
    parser = DockerfileParser(path=str(DOCKERFILE))
    instructions = parser.structure
    stages, current = [], None
    for ins in instructions:
        if ins["instruction"] == "FROM":
            current = {"from": ins["value"], "ins": []}
            stages.append(current)
        elif current is not None:
            current["ins"].append(ins)
    check(len(stages) >= 2, f"Dockerfile: multi-stage ({len(stages)} FROM)")
    builder, final = stages[0], stages[-1]
    get = lambda stage, name: [i["value"] for i in stage["ins"] if i["instruction"] == name]  # noqa: E731
    check(any(re.search(r"\bcargo build\b.*--release\b", v) and "--locked" in v for v in get(builder, "RUN")),
          f"Dockerfile: the builder ({builder['from']}) runs cargo build --release --locked")

    users = get(final, "USER")
    user = users[-1] if users else "root"
    uid, _, gid = user.partition(":")
    check(uid.isdigit() and int(uid) != 0,
          f"Dockerfile: the final stage's USER ({user}) is a numeric non-root UID (Kubernetes verifies runAsNonRoot "
          "only for numeric users)")
    sc = pod.get("securityContext", {})
    run_as = container.get("securityContext", {}).get("runAsUser", sc.get("runAsUser"))
    check(run_as is None or str(run_as) == uid, f"the pod's runAsUser ({run_as}) is the image's USER ({uid})")

    copies = get(final, "COPY")
    check(any(v.startswith("--from=") and re.search(r"\bcrm-sync\s+/usr/local/bin/crm-sync$", v) for v in copies),
          "Dockerfile: the final stage copies the binary from the builder to /usr/local/bin/crm-sync")
    check(any(v.rstrip().endswith("/etc/crm-sync/crm-sync.toml") or v.rstrip().endswith("/etc/crm-sync/") for v in copies),
          "Dockerfile: the final stage puts a configuration at /etc/crm-sync/crm-sync.toml")
    check(REFERENCE_HTTP_LINE in reference.splitlines(), f"config/crm-sync.toml has the line the Dockerfile rewrites ({REFERENCE_HTTP_LINE})")

    exposed = {int(p.split("/")[0]) for v in get(final, "EXPOSE") for p in v.split()}
    ref_http = split_addr(service_settings(tomllib.loads(reference))[0])[1]
    ref_grpc = split_addr(tomllib.loads(reference).get("grpc", {}).get("addr", ":0"))[1]
    wanted = {ref_http, k8s_http_port} | ({ref_grpc} if ref_grpc else set()) | ({k8s_grpc_port} if k8s_grpc_port else set())
    check(wanted <= exposed, f"Dockerfile: EXPOSE {sorted(exposed)} covers the HTTP and gRPC ports {sorted(wanted)}")
    check(get(final, "STOPSIGNAL") == ["SIGTERM"], "Dockerfile: STOPSIGNAL SIGTERM")
    check(get(final, "ENTRYPOINT") == ['["crm-sync"]'], 'Dockerfile: ENTRYPOINT ["crm-sync"]')
    check([re.sub(r"\s+", "", v) for v in get(final, "CMD")] == ['["run","--config","/etc/crm-sync/crm-sync.toml"]'],
          'Dockerfile: CMD ["run", "--config", "/etc/crm-sync/crm-sync.toml"]')

    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    check({"target", ".git"} <= ignored, ".dockerignore excludes target and .git")


# ---- systemd -----------------------------------------------------------------------------


def parse_unit(text):
    sections, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            k, v = line.split("=", 1)
            current.setdefault(k.strip(), []).append(v.strip())
    return sections


def check_unit(deadline_ms):
    unit = parse_unit(UNIT.read_text())
    check({"Unit", "Service", "Install"} <= set(unit), "crm-sync.service: [Unit], [Service] and [Install]")
    service = unit.get("Service", {})
    last = lambda key, default=None: service.get(key, [default])[-1]  # noqa: E731
    check(last("ExecStart") == "/usr/local/bin/crm-sync run --config /etc/crm-sync/crm-sync.toml",
          "crm-sync.service: ExecStart=/usr/local/bin/crm-sync run --config /etc/crm-sync/crm-sync.toml")
    check(last("User") is not None or last("DynamicUser") == "yes", "crm-sync.service: a User= or DynamicUser=yes")
    check(any(v.lstrip("-") == "/etc/crm-sync/env" for v in service.get("EnvironmentFile", [])),
          "crm-sync.service: EnvironmentFile=-/etc/crm-sync/env (the secrets)")
    check(last("Restart") in ("on-failure", "always"), "crm-sync.service: Restart=on-failure")
    check(last("KillSignal", "SIGTERM") == "SIGTERM", "crm-sync.service: KillSignal=SIGTERM")
    stop = last("TimeoutStopSec")
    try:
        stop_ms = timespan_ms(stop) if stop is not None else 90_000  # systemd's DefaultTimeoutStopSec
    except ValueError as e:
        stop_ms = 0
        print(f"      {e}")
    check(stop_ms >= deadline_ms + STOP_MARGIN_MS,
          f"crm-sync.service: TimeoutStopSec ({stop}) is above service.shutdown_deadline_ms ({deadline_ms} ms, "
          f"config/crm-sync.toml) by at least {STOP_MARGIN_MS // 1000} s",
          "systemd would SIGKILL a member still draining")
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes")):
        check(last(key) == value, f"crm-sync.service: {key}={value}")


# ---- check-config ------------------------------------------------------------------------


def check_config(binary):
    """The ConfigMap's configuration through `crm-sync check-config --no-secrets`: the
    secret references are checked, not resolved (the secrets are not here)."""
    docs = load_manifests_quietly()
    configmap = one(docs, "ConfigMap")
    text = configmap["data"]["crm-sync.toml"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "crm-sync.toml"
        path.write_text(text)
        result = subprocess.run([binary, "check-config", "--no-secrets", str(path)], capture_output=True, text=True)
    out = (result.stdout + result.stderr).strip().replace(str(path), "configmap.yaml:crm-sync.toml")
    print(f"      {out}")
    check(result.returncode == 0,
          f"`{os.path.relpath(binary, ROOT)} check-config --no-secrets` accepts the ConfigMap's configuration")


def load_manifests_quietly():
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None] for p in sorted(K8S.glob("*.yaml"))}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "check-config":
        check_config(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "checks":
        reference = REFERENCE.read_text()
        _, reference_deadline_ms = service_settings(tomllib.loads(reference))
        docs = load_manifests()
        pod, container, _, http_port, grpc_port = check_kubernetes(docs)
        check_dockerfile(pod, container, http_port, grpc_port, reference)
        check_unit(reference_deadline_ms)
    else:
        sys.exit(__doc__)
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
