"""The README's Flower deployment against an outsider who holds the public ca.crt and reaches the SuperLink's
machine over the network (issue 25): they must neither register a SuperNode key nor start a run.

flwr 1.42 serves the SuperLink's Fleet, Control and runtime APIs on one HTTPS port, and its open-source Control
API authenticates nobody. 127.0.0.2 stands for the SuperLink machine's network address (the only address an
outsider reaches); 127.0.0.1 is its loopback, where the operator's `flwr` talks to the SuperLink.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flower_harness import FlowerDeployment, flwr_available, make_supernode_key, make_tls_files, write_flwr_config
from test_flower import make_tiny_packs, write_app

pytestmark = [pytest.mark.flower, pytest.mark.slow,
              pytest.mark.skipif(not flwr_available(), reason="flwr is not installed (pip install 'nfed[flower]')")]

NETWORK = "127.0.0.2"


def write_outsider_app(app_dir: Path, marker: Path) -> Path:
    """The outsider's own Flower app: its ServerApp writes `marker` on the SuperLink's host when it runs."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "outsider_app.py").write_text(
        "from pathlib import Path\n\nfrom flwr.serverapp import ServerApp\n\napp = ServerApp()\n\n\n"
        "@app.main()\ndef main(grid, context):\n"
        f"    Path({str(marker)!r}).write_text('the outsider ran code here')\n")
    (app_dir / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "outsider"\nversion = "1.0.0"\ndescription = "an outsider app"\nlicense = "MIT"\n'
        'dependencies = ["flwr"]\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "outsider"\n\n'
        '[tool.flwr.app.components]\nserverapp = "outsider_app:app"\nclientapp = "outsider_app:app"\n\n'
        '[tool.flwr.app.config]\nx = 1\n')
    return app_dir


def listed(flower: FlowerDeployment, *args: str) -> str:
    """What the operator's `flwr ARGS nfed-test --format json` prints (it must succeed)."""
    result = flower.flwr(*args, "nfed-test", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_an_outsider_holding_ca_crt_can_neither_register_a_supernode_nor_start_a_run(tmp_path):
    tls = make_tls_files(tmp_path / "tls", extra_ips=[NETWORK])
    outsider_home, marker = tmp_path / "outsider", tmp_path / "outsider-ran"
    outsider_key = make_supernode_key(outsider_home, "outsider.key")[1]
    outsider_app = write_outsider_app(tmp_path / "outsider-app", marker)
    district = "Gangnam-gu"
    pack = make_tiny_packs(tmp_path / "packs", districts=(district,), counts=((3, 1, 1),))[district]
    app = write_app(tmp_path / "app", tmp_path / "run", "--rounds", "1", "--min-clients", "1",
                    "--expected-nodes", "1", "--deadline", "120", "--no-round-eval")
    key, public_key = make_supernode_key(tmp_path / "keys", district)
    with FlowerDeployment(tmp_path / "flower", tls=tls, node_auth=True, gateway_host=NETWORK) as flower:
        flower.start_superlink()
        # every port of the SuperLink's machine the outsider reaches: the Fleet address and the SuperLink's own
        for address in sorted({flower.fleet_address, f"{NETWORK}:{flower.superlink_port}"}):
            write_flwr_config(outsider_home, address, tls.ca_cert)
            register = flower.flwr("supernode", "register", str(outsider_key), "nfed-test", flwr_home=outsider_home)
            run = flower.flwr("run", str(outsider_app), "nfed-test", flwr_home=outsider_home)
            assert register.returncode != 0, f"{address}: {register.stdout}{register.stderr}"
            assert run.returncode != 0, f"{address}: {run.stdout}{run.stderr}"
        refused = (flower.workdir / "gateway.log").read_text()
        for call in ("register-node", "start-run"):   # turned away by the gateway, not by chance
            assert f"403 for POST '/v1/control/{call}'" in refused, refused
        time.sleep(2)   # a run the SuperLink had accepted would have started its ServerApp by now
        assert not marker.exists(), flower.logs()
        assert outsider_key.read_text().split()[1] not in listed(flower, "supernode", "list")
        assert json.loads(listed(flower, "ls")).get("runs", []) == []

        # the operator, on the SuperLink's loopback, still registers a district, whose node joins and trains
        flower.register_supernode(public_key)
        flower.start_supernodes({district: {"pack": str(pack)}}, keys={district: key})
        result = flower.run_app(app, timeout=120)
        assert result.returncode == 0, result.output + flower.logs()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "finished", status
