"""One model over several machines: MLX's distributed engine (mx.distributed) under the daemon."""
