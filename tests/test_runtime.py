"""engine.runtime: a UserError raised inside Ray (a plain task, a Ray Data map, a Ray Train worker) reaches the
caller as the one-line UserError itself, never as Ray's wrapped traceback."""

from __future__ import annotations

import numpy as np
import pytest
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.runtime import quiet_ray_data, user_error_in, user_errors

MESSAGE = "store.h5ad: no counts in X: pass --layer counts"


def _refusing() -> object:
    """A function Ray ships by value (defined in a test, whose module the workers cannot import)."""
    message = MESSAGE

    def refuse(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from scdrugmap_ray.engine.errors import UserError

        raise UserError(message)

    return refuse


def test_plain_task_user_error_is_one_line(ray_session: None) -> None:
    import ray

    task = ray.remote(_refusing())
    with pytest.raises(UserError) as caught, user_errors():
        ray.get(task.remote({}))
    assert str(caught.value) == MESSAGE and type(caught.value) is UserError
    try:
        ray.get(task.remote({}))
    except Exception as err:  # Ray's own error: also a UserError by class, with the remote traceback as text
        assert isinstance(err, UserError) and "\n" in str(err)
        assert str(user_error_in(err)) == MESSAGE


def test_ray_data_user_error_is_one_line(ray_session: None) -> None:
    import ray

    quiet_ray_data()
    ds = ray.data.range(8).map_batches(_refusing(), batch_format="numpy")
    with pytest.raises(UserError) as caught, user_errors():
        ds.take_all()
    assert str(caught.value) == MESSAGE


@pytest.mark.slow
def test_ray_train_worker_user_error_is_one_line(ray_session: None, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Read from the WorkerGroupError's public ``worker_failures`` (the worker's original exception), not its text."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    refuse = _refusing()
    trainer = TorchTrainer(lambda config: refuse({}), scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(storage_path=str(tmp_path), name="refuse"))
    with pytest.raises(UserError) as caught, user_errors():
        trainer.fit()
    assert str(caught.value) == MESSAGE and type(caught.value) is UserError


def test_other_errors_pass_through(ray_session: None) -> None:
    import ray

    @ray.remote
    def broken() -> None:
        raise ValueError("a bug, not a user error")

    with pytest.raises(ray.exceptions.RayTaskError), user_errors():
        ray.get(broken.remote())


_NOTICE_SCRIPT = '''
import os, sys
import ray
from scdrugmap_ray.engine.runtime import ray_native_notices_dropped

class Same:
    def __call__(self, batch):
        return batch

def job():
    ray.data.range(4).map_batches(Same, concurrency=1).take_all()

ray.init(include_dashboard=False, num_cpus=1, logging_level="ERROR")
job()
sys.stderr.flush()
os.write(2, b"MARK\\n")
with ray_native_notices_dropped():
    job()
    os.write(2, b"native line kept\\n")
    print("python line kept", file=sys.stderr)
'''


def test_ray_native_notice_dropped_other_lines_kept(tmp_path: object) -> None:
    """A real Ray Data actor pool makes Ray's C++ core worker write its constructor-arguments notice to file
    descriptor 2 (what users of the CLI saw on every embed); inside ``ray_native_notices_dropped`` it is gone
    while other native and Python lines still pass."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _NOTICE_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, _, after = proc.stderr.partition("MARK\n")
    assert "has constructor arguments in the object store" in before, proc.stderr[-3000:]  # Ray still says it
    assert "has constructor arguments in the object store" not in after, after
    # the native line passes the filter (a thread), Python's goes straight to the terminal: both arrive
    assert "native line kept" in after and "python line kept" in after, after
