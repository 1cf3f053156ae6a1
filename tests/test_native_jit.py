"""daemon.cpu.native_jit: a process given its environment has MLX build its kernels with a g++ that
adds -march=native, into a folder of its own; nothing changes where there is no g++."""

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

from daemon.cpu import native_jit

LINUX_X86 = sys.platform.startswith("linux") and platform.machine() == "x86_64"
needs_gxx = pytest.mark.skipif(not LINUX_X86 or shutil.which("g++") is None, reason="x86-64 Linux with g++")

KERNEL = textwrap.dedent("""
    import json, os
    import mlx.core as mx
    from daemon.cpu import native_jit
    silu = mx.compile(lambda x: x * mx.sigmoid(x))
    x = mx.random.normal((4096,), key=mx.random.key(0))
    print(json.dumps({"active": native_jit.active(), "same": mx.array_equal(silu(x), x * mx.sigmoid(x)).item()}))
""")


@needs_gxx
def test_mlx_builds_its_kernels_with_the_wrapper_into_its_own_folder(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    changes = native_jit.environment(tmp_path, env)
    assert set(changes) == {"PATH", "TMPDIR", native_jit.MARK}
    wrapper = os.path.join(changes["PATH"].split(os.pathsep)[0], "g++")
    assert "-march=native" in open(wrapper).read() and os.access(wrapper, os.X_OK)
    assert subprocess.run([wrapper, "--version"], capture_output=True).returncode == 0
    run = subprocess.run([sys.executable, "-c", KERNEL], capture_output=True, text=True, timeout=120, env={**env, **changes})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"active": True, "same": True}  # the same values as MLX's own ops
    built = [f for _, _, files in os.walk(changes["TMPDIR"]) for f in files if f.endswith(".so")]
    assert built  # MLX kept the kernel it built in mtpd's folder
    assert native_jit.environment(tmp_path, env) == changes  # the next process finds the same folder


def test_nothing_changes_without_a_gxx_or_when_the_user_says_no(tmp_path):
    assert native_jit.environment(tmp_path, {"PATH": str(tmp_path)}) == {}
    assert native_jit.environment(tmp_path, {"PATH": os.environ["PATH"], native_jit.MARK: "0"}) == {}
    assert not list(tmp_path.iterdir())


def test_pytest_itself_runs_mlx_as_it_comes():
    assert native_jit.active() is False
