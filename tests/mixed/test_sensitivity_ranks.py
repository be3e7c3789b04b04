"""Sensitivities over ranks (``measure_sensitivity(dist=...)``): two gloo ranks on 127.0.0.1 each
measure half of the layers and both end with the report of one process, number for number."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

CASE = textwrap.dedent('''
    import torch
    import specquant as sq
    from specquant.mixed import measure_sensitivity

    def run(dist=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24),
                                    torch.nn.ReLU(), torch.nn.Linear(24, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 5)).eval()
        x = torch.randn(80, 12, generator=torch.Generator().manual_seed(1))
        steps = []
        rep = measure_sensitivity(model, x, (2, 3, 4), sq.GPTQConfig(bits=4), metric="loss", batch_size=32,
                                  progress=lambda done, total: steps.append((done, total)), dist=dist)
        d = rep.to_dict()
        d.pop("seconds")
        return {"report": d, "total": steps[-1][1]}
''')

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as tdist
    from specquant.engine.distributed import Dist
    exec(open(sys.argv[1]).read())
    rank, port, out = int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist = Dist.current()
    res = run(dist)
    res["received"] = dist.received_bytes
    open(out, "w").write(json.dumps(res))
    tdist.destroy_process_group()
''')


def test_two_ranks_measure_half_the_layers_each_and_get_the_whole_report(tmp_path):
    from specquant.cli.distributed import free_port

    (tmp_path / "case.py").write_text(CASE)
    (tmp_path / "worker.py").write_text(WORKER)
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "case.py"), str(r), port,
                               str(tmp_path / f"rank{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    scope: dict = {}
    exec(CASE, scope)  # noqa: S102 - the test's own text, shared with the workers
    one = json.loads(json.dumps(scope["run"]()))  # through JSON, as the ranks' results
    assert one["total"] == 4 * 3  # 4 layers × 3 widths in one process
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["total"] for r in ranks] == [2 * 3, 2 * 3]  # layers 0, 2 on rank 0; 1, 3 on rank 1
    for r in ranks:
        assert r["report"] == one["report"]  # every cost and per-row cost, exactly
        assert r["received"] > 0
    assert all(layer["row_costs"] for layer in one["report"]["layers"])
