"""One of two processes of the multi-process synced-BatchNorm test (run by test_multidevice.py).

Usage: python -m tests.multiprocess_worker PROCESS_ID PORT
Each process owns 4 CPU devices; together they form an 8-device mesh. Each process checks
its own shard of the output and the replicated running statistics against the float64
reference computed on the global batch, then prints "OK <max error>".
"""

import os
import sys


def main(process_id: int, port: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import normzoo

    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    mesh = jax.make_mesh((8,), ("batch",))
    x_global = np.random.default_rng(0).normal(size=(32, 4, 4, 6)).astype(np.float32) * 2 + 1e4
    local = x_global[process_id * 16:(process_id + 1) * 16]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), local)
    layer = normzoo.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.5)
    variables = layer.init(jax.random.key(0), local[:4])
    fwd = jax.jit(jax.shard_map(
        lambda v, x: layer.apply(v, x, mutable=["batch_stats"]),
        mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()),
    ))
    y, upd = fwd(variables, x)
    shards = sorted(y.addressable_shards, key=lambda s: s.index[0].start)
    y_local = np.concatenate([np.asarray(s.data) for s in shards])
    x64 = x_global.astype(np.float64)
    want = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5)
    err = np.abs(y_local - want[process_id * 16:(process_id + 1) * 16]).max()
    mean = np.asarray(upd["batch_stats"]["mean"].addressable_data(0))
    var = np.asarray(upd["batch_stats"]["var"].addressable_data(0))
    assert err < 1e-2, err
    np.testing.assert_allclose(mean, 0.5 * x64.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(var, 0.5 + 0.5 * x64.var((0, 1, 2)), rtol=1e-4)
    print(f"OK {err:.2e}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
