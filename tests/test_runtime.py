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
