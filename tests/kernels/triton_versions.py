"""The Tritons the compile checks (test_sm90_compile.py, test_compile_only.py) run under, each
in subprocesses: the installed one, then each directory named in
EXPANSE_TRITON_COMPAT_PATHS (os.pathsep-separated; put ahead of it on PYTHONPATH).  .ci/run
names one holding Triton 3.6, the GPU machine's, so a kernel that compiles under the
installed Triton but not under the GPU's fails here, not in a GPU session."""
import os

PATHS = [None] + [p for p in os.environ.get("EXPANSE_TRITON_COMPAT_PATHS", "").split(os.pathsep)
                  if p]


def label(path) -> str:
    return "installed" if path is None else os.path.basename(os.path.normpath(path))


def subprocess_env(path) -> dict:
    """The environment of a compile check's subprocess: never the interpreter, and the
    Triton at ``path`` first on PYTHONPATH (None: the installed one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([path] + [p for p in [env.get("PYTHONPATH")] if p])
    return env
