"""docker-compose.yml, checked by structure (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from nas3d.storages import resolve_storage_url

REPO = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_and_their_wiring() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "s3", "dashboard", "worker"}
    for name in ("dashboard", "worker"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_dashboard_and_database_bind_to_loopback_only() -> None:
    services = compose()["services"]
    for name in ("dashboard", "postgres", "s3"):
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)


def test_worker_storage_matches_the_database_and_shares_artifacts() -> None:
    services = compose()["services"]
    env = services["postgres"]["environment"]
    url = services["worker"]["environment"]["NAS3D_STORAGE"]
    expected = f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/"
    assert url == expected + env["POSTGRES_DB"]
    assert resolve_storage_url(url) == url
    assert services["dashboard"]["environment"]["NAS3D_STORAGE"] == url


def test_workers_and_dashboard_share_the_s3_artifact_store() -> None:
    from nas3d.cli import build_parser

    services = compose()["services"]
    worker, dashboard, s3 = services["worker"]["environment"], services["dashboard"], services["s3"]
    bucket = worker["NAS3D_ARTIFACTS"].removeprefix("s3://").split("/")[0]
    assert f"-bucket={bucket}" in s3["command"]  # created when the server starts
    port = next(p.split("=")[1] for p in s3["command"].split() if p.startswith("-s3.port="))
    assert worker["AWS_ENDPOINT_URL"] == f"http://s3:{port}" == dashboard["environment"]["AWS_ENDPOINT_URL"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert worker[key] == s3["environment"][key] == dashboard["environment"][key]
    assert "s3data" in compose()["volumes"]
    # nas3d's dashboard (the image's entrypoint is `nas3d`) reads each study's recorded store
    assert dashboard["build"] == services["worker"]["build"] == "."
    parsed = build_parser().parse_args(dashboard["command"])
    assert (parsed.command, parsed.host, parsed.port) == ("dashboard", "0.0.0.0", 8080)
    assert dashboard["ports"] == [f"127.0.0.1:{parsed.port}:{parsed.port}"]
    # boto3 for s3:// stores, and Graphviz for pictures, in the image both run
    assert '".[postgres,s3]"' in (REPO / "Dockerfile").read_text()


def test_worker_gets_gpus_and_stops_gracefully() -> None:
    worker = compose()["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert worker["stop_signal"] == "SIGTERM"
    assert worker["command"][0] == "launch"
    assert (REPO / "Dockerfile").exists() and worker["build"] == "."
    assert 'ENTRYPOINT ["nas3d"]' in (REPO / "Dockerfile").read_text()


# --- Kubernetes (deploy/k8s), checked offline against the Kubernetes schemas ----------------------

K8S = REPO / "deploy" / "k8s"
K8S_VERSIONS = ("1.29", "1.33")  # Indexed Jobs and the completion-index annotation: GA since 1.24


def k8s_objects() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_object(kind: str, name: str) -> dict:
    [found] = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def strings(node: object) -> list[str]:
    """Every string value in parsed YAML (keys and comments aside)."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def expand(args: list[str], container: dict) -> list[str]:
    """``$(VAR)`` as the kubelet expands it, with a placeholder value per variable the container defines."""
    names = {e["name"] for e in container.get("env", [])}
    out = []
    for arg in args:
        for name in names:
            arg = arg.replace(f"$({name})", "7" if "INDEX" in name else f"value-of-{name.lower()}")
        assert "$(" not in arg, f"{arg!r}: a variable the container does not define"
        out.append(arg)
    return out


def test_k8s_manifests_validate_against_the_schemas() -> None:
    import kubernetes_validate

    objects = k8s_objects()
    assert {o["kind"] for o in objects} >= {"Job", "StatefulSet", "Deployment", "Service", "ConfigMap"}
    for obj in objects:
        for version in K8S_VERSIONS:
            # strict: unknown fields (a typo such as `limit:`) fail too
            kubernetes_validate.validate(obj, version, strict=True)


def test_k8s_credentials_only_from_secrets() -> None:
    assert not [o for o in k8s_objects() if o["kind"] == "Secret"], "Secrets come from kubectl, not from here"
    for value in strings(k8s_objects()):
        assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"a URL with a password: {value!r}"
    for obj in k8s_objects():
        if obj["kind"] not in ("Job", "Deployment", "StatefulSet"):
            continue
        for container in containers(obj):
            for env in container.get("env", []):
                if re.search(r"PASSWORD|STORAGE$|SECRET|TOKEN|KEY", env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (obj["metadata"]["name"], env)


def test_k8s_dashboard_and_database_stay_inside_the_cluster() -> None:
    objects = k8s_objects()
    assert not [o for o in objects if o["kind"] in ("Ingress", "Gateway", "HTTPRoute")]
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"nas3d-dashboard", "nas3d-postgres"}
    for service in services:
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
        assert not any("nodePort" in port for port in service["spec"]["ports"])
    for obj in objects:
        if obj["kind"] in ("Job", "Deployment", "StatefulSet"):
            assert not pod_spec(obj).get("hostNetwork")
            assert not any("hostPort" in p for c in containers(obj) for p in c.get("ports", []))


def test_k8s_workers_one_gpu_each_after_the_study_exists() -> None:
    from nas3d.cli import build_parser

    workers = k8s_object("Job", "nas3d-workers")
    assert workers["spec"]["completionMode"] == "Indexed"
    [worker] = pod_spec(workers)["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    index = {e["name"]: e for e in worker["env"]}["WORKER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # the arguments are ones `nas3d` accepts (the image's entrypoint is `nas3d`)
    parsed = build_parser().parse_args(expand(worker["args"], worker))
    assert (parsed.command, parsed.device, parsed.worker_index) == ("worker", "cuda", 7)
    [wait] = pod_spec(workers)["initContainers"]
    assert "nas3d status --study-name" in wait["command"][-1]

    create = k8s_object("Job", "nas3d-create-study")
    [creator] = pod_spec(create)["containers"]
    assert build_parser().parse_args(expand(creator["args"], creator)).command == "create-study"
    study = k8s_object("ConfigMap", "nas3d-study")["data"]
    assert (REPO / study["study-file"]).is_file()
    assert "COPY studies ./studies" in (REPO / "Dockerfile").read_text()


def test_k8s_probes_where_something_answers() -> None:
    for kind, name in (("Deployment", "nas3d-dashboard"), ("StatefulSet", "nas3d-postgres")):
        [container] = pod_spec(k8s_object(kind, name))["containers"]
        assert "readinessProbe" in container and "livenessProbe" in container, name
    # a worker serves nothing: its liveness is the trial heartbeat, not a probe that would kill a trial
    [worker] = pod_spec(k8s_object("Job", "nas3d-workers"))["containers"]
    assert "livenessProbe" not in worker


def test_k8s_matches_docker_compose() -> None:
    services = compose()["services"]
    [worker] = pod_spec(k8s_object("Job", "nas3d-workers"))["containers"]
    env = {e["name"]: e for e in worker["env"]}
    # Both record one artifact store per study, in different forms: compose serves an S3 bucket from its
    # own object store; the manifests mount a ReadWriteMany volume (an S3 Secret is the alternative).
    assert services["worker"]["environment"]["NAS3D_ARTIFACTS"].startswith("s3://") and "s3" in services
    assert env["NAS3D_ARTIFACTS"]["value"] == "/artifacts"
    aws = {k for k in services["worker"]["environment"] if k.startswith("AWS_")}
    assert set(services["worker"]["environment"]) - aws <= set(env)
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert pod_spec(k8s_object("Job", "nas3d-workers"))["terminationGracePeriodSeconds"] == grace
    [dashboard] = pod_spec(k8s_object("Deployment", "nas3d-dashboard"))["containers"]
    assert dashboard["args"] == services["dashboard"]["command"]  # `nas3d dashboard` in both
    assert {"name": "artifacts", "mountPath": "/artifacts", "readOnly": True} in dashboard["volumeMounts"]
    [postgres] = pod_spec(k8s_object("StatefulSet", "nas3d-postgres"))["containers"]
    assert postgres["image"] == services["postgres"]["image"]
    pg_env = {e["name"]: e.get("value") for e in postgres["env"]}
    assert pg_env["POSTGRES_USER"] == services["postgres"]["environment"]["POSTGRES_USER"]
    assert pg_env["POSTGRES_DB"] == services["postgres"]["environment"]["POSTGRES_DB"]


def test_k8s_plan_workers_one_gpu_each_after_the_plan_exists() -> None:
    from nas3d.cli import build_parser

    workers, search_workers = k8s_object("Job", "nas3d-plan-workers"), k8s_object("Job", "nas3d-workers")
    assert workers["spec"]["completionMode"] == "Indexed"
    assert workers["spec"]["completions"] == workers["spec"]["parallelism"]
    [worker] = pod_spec(workers)["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in worker["env"]}
    index = env["WORKER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # `nas3d reproduce --worker` on the plan the ConfigMap names (the image's entrypoint is `nas3d`)
    parsed = build_parser().parse_args(expand(worker["args"], worker))
    assert (parsed.command, parsed.worker, parsed.device, parsed.worker_index) == (
        "reproduce", True, "cuda", 7)
    assert parsed.name == "value-of-nas3d_plan" and parsed.storage is None  # the URL comes from the Secret
    assert env["NAS3D_PLAN"]["valueFrom"]["configMapKeyRef"] == {"name": "nas3d-plan", "key": "plan-name"}
    assert k8s_object("ConfigMap", "nas3d-plan")["data"]["plan-name"]
    [wait] = pod_spec(workers)["initContainers"]
    assert 'nas3d reproduce --name "$NAS3D_PLAN" --status' in wait["command"][-1]
    # stopping and storage as the search workers': the same grace period, volumes and mounts, no probe
    [search_worker] = pod_spec(search_workers)["containers"]
    for key in ("terminationGracePeriodSeconds", "restartPolicy", "volumes"):
        assert pod_spec(workers)[key] == pod_spec(search_workers)[key], key
    assert worker["volumeMounts"] == search_worker["volumeMounts"] and "livenessProbe" not in worker
    assert workers["spec"]["backoffLimit"] == search_workers["spec"]["backoffLimit"]

    [creator] = pod_spec(k8s_object("Job", "nas3d-create-plan"))["containers"]
    created = build_parser().parse_args(expand(creator["args"], creator))
    assert (created.command, created.create, created.cpu, created.name) == (
        "reproduce", True, True, "value-of-nas3d_plan")
    assert {e["name"]: e for e in creator["env"]}["NAS3D_PLAN"] == env["NAS3D_PLAN"]


def test_k8s_the_study_and_plan_makers_record_the_artifact_store_the_workers_mount() -> None:
    """A study records its artifact store when it is made; every worker and the dashboard then use the
    recorded one. So the Jobs that make them must name the shared volume, not a pod's own folder."""
    [dashboard] = pod_spec(k8s_object("Deployment", "nas3d-dashboard"))["containers"]
    for names in (("nas3d-create-study", "nas3d-workers"), ("nas3d-create-plan", "nas3d-plan-workers")):
        for job in (k8s_object("Job", name) for name in names):
            container = pod_spec(job)["containers"][0]
            location = {e["name"]: e for e in container["env"]}["NAS3D_ARTIFACTS"]["value"]
            [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == location]
            [volume] = [v for v in pod_spec(job)["volumes"] if v["name"] == mount["name"]]
            assert volume["persistentVolumeClaim"]["claimName"] == "nas3d-artifacts", job["metadata"]["name"]
            assert any(m["mountPath"] == location for m in dashboard["volumeMounts"])
