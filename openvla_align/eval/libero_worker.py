"""One LIBERO environment in its own process, driven by :class:`openvla_align.eval.libero.LiberoEnv`.

Run by file path with the LIBERO interpreter (``$LIBERO_PYTHON libero_worker.py``), so it imports only the standard
library, numpy and LIBERO: LIBERO may live in a venv of its own (robosuite 1.4, mujoco 2.3, numpy < 2) that has
neither torch nor this package.

Protocol: length-prefixed pickle frames (8-byte big-endian length, then the pickle) on the process's original
stdin/stdout. Each request is ``(command, args)``; each reply ``("ok", value)`` or ``("error", traceback)``; the
``reset`` command sends two replies (the RNG state right after ``env.reset()``, then the observation), so that the
caller can chain the next copy's reset without waiting for this copy's wait steps. Arrays travel as
``(dtype, shape, bytes)`` and the RNG state as plain Python values: the caller may have another numpy major version,
whose pickles of arrays this one cannot read. LIBERO's own printing goes to stderr, never into the protocol; stdin
is /dev/null for it (``import libero.libero`` without a config file asks questions there and now fails instead).
"""

import os
import sys

# Run by file path, Python puts this file's folder first on sys.path: this package's eval/, whose libero.py would
# shadow LIBERO's package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import pickle  # noqa: E402
import struct  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

_HEADER = struct.Struct(">Q")
PICKLE_PROTOCOL = 4  # readable by every Python 3.8+ on the other side


def write_frame(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream):
    """The next frame's object; EOFError when the other side closed the pipe (between or inside a frame)."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("pipe closed")
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("pipe closed inside a frame")
    return pickle.loads(data)


def pack_array(a) -> tuple:
    a = np.ascontiguousarray(a)
    return (a.dtype.str, a.shape, a.tobytes())


def rng_state() -> tuple:
    """numpy's global generator state (the one ``env.seed`` seeds and LIBERO's placement samplers draw from)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached))


def set_rng_state(state) -> None:
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------------- LIBERO


def load_libero_task(suite: str, task_id: int, resolution: int):
    """OpenVLA-OFT's environment for one task: the suite's benchmark in its default task order, the task's BDDL file
    under LIBERO's ``bddl_files``, an ``OffScreenRenderEnv`` rendering both cameras at ``resolution``, seeded with 0.
    Returns ``(env, language, initial_states)``."""
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    task_suite = benchmark.get_benchmark_dict()[suite]()
    task = task_suite.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=resolution, camera_widths=resolution)
    env.seed(0)
    return env, task.language, task_suite.get_task_init_states(task_id)


def assets_dir() -> str:
    """Where LIBERO loads its meshes and textures from, found without downloading anything: the package's own
    ``libero/libero/assets`` when it exists (LIBERO's repository and PyPI's 0.1.1 both look there first), else the
    Hugging Face cache PyPI's 0.1.1 fills by itself (``get_assets_path``) when there is none."""
    import libero.libero

    local = os.path.join(os.path.dirname(os.path.abspath(libero.libero.__file__)), "assets")
    if os.path.isdir(local) or not hasattr(libero.libero, "get_assets_path"):
        return local
    return os.path.join(os.path.expanduser("~"), ".cache", "libero", "assets")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_installation() -> dict:
    """What ``LiberoEnv.check_runtime`` reports: ``{"problem": kind or None, "detail": str, ...}`` for the first of:
    the config file, importing LIBERO, its assets, an offscreen renderer under the current ``MUJOCO_GL``."""
    config = os.path.join(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")), "config.yaml")
    if not os.path.isfile(config):
        return {"problem": "config", "detail": config}
    try:
        import libero.libero  # noqa: F401
        from libero.libero import benchmark  # noqa: F401
    except Exception as exc:  # an import of a whole simulator fails in many ways; each is reported as it is
        return {"problem": "import", "detail": _first_line(exc)}
    where = assets_dir()
    if not os.path.isdir(where) or not any(files for _, _, files in os.walk(where)):
        return {"problem": "assets", "detail": where, "exists": os.path.isdir(where)}
    gl = os.environ.get("MUJOCO_GL", "")
    try:
        from robosuite.utils.binding_utils import MjRenderContextOffscreen, MjSim

        xml = (
            '<mujoco><worldbody><light pos="0 0 1"/><geom type="sphere" size="0.1"/>'
            '<camera name="probe" pos="0 0 1"/></worldbody></mujoco>'
        )
        sim = MjSim.from_xml_string(xml)
        MjRenderContextOffscreen(sim, device_id=-1)  # as robosuite's environments start theirs
        image = sim.render(camera_name="probe", width=8, height=8)
        if np.asarray(image).shape != (8, 8, 3):
            raise RuntimeError(f"rendered an image of shape {np.asarray(image).shape}, not (8, 8, 3)")
    except Exception as exc:  # GL stacks fail with many exception types (ImportError, EGLError, RuntimeError...)
        return {"problem": "renderer", "detail": _first_line(exc), "mujoco_gl": gl}
    return {"problem": None, "detail": "", "assets": where, "mujoco_gl": os.environ.get("MUJOCO_GL", gl)}


def _observation(obs, keys) -> dict:
    return {k: pack_array(obs[k]) for k in keys}


class Worker:
    """The commands, over one environment built by ``load_task(suite, task_id, resolution)``."""

    def __init__(self, load_task=load_libero_task):
        self.load_task = load_task
        self.env = None
        self.keys = ()

    def make(self, send, suite: str, task_id: int, resolution: int, keys):
        self.env, language, self.initial_states = self.load_task(suite, task_id, resolution)
        self.keys = tuple(keys)
        return {"language": language, "initial_states": len(self.initial_states), "rng": rng_state()}

    def reset(self, send, episode: int, rng, wait_steps: int, wait_action):
        """OFT's episode start: ``env.reset()`` from the generator state the episode has in OFT's one sequential
        environment, ``set_init_state`` with the benchmark's initial state ``episode``, ``wait_steps`` steps of
        ``wait_action``."""
        set_rng_state(rng)
        self.env.reset()
        send(("ok", rng_state()))
        obs = self.env.set_init_state(self.initial_states[episode])
        for _ in range(wait_steps):
            obs, _reward, _done, _info = self.env.step(list(wait_action))
        return _observation(obs, self.keys)

    def step(self, send, action):
        obs, reward, done, _info = self.env.step(list(action))
        return {"obs": _observation(obs, self.keys), "reward": float(reward), "done": bool(done)}

    def check(self, send):
        return check_installation()

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env = None


def serve(worker: Worker, requests, replies) -> None:
    """Answer requests until ``close`` or the end of the input (the caller is gone); ``close`` has no reply (the
    caller may have stopped reading)."""

    def send(message):
        write_frame(replies, message)

    while True:
        try:
            command, args = read_frame(requests)
        except EOFError:
            command, args = "close", {}
        if command == "close":
            worker.close()
            return
        try:
            send(("ok", getattr(worker, command)(send, **args)))
        except Exception:
            send(("error", traceback.format_exc()))


def protocol_streams():
    """The process's stdin/stdout for the protocol alone: both are duplicated for it, then file descriptors 0 and 1
    become /dev/null and stderr, so that no library's print or ``input()`` (Python or C) touches a frame."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return requests, replies


def main(load_task=load_libero_task) -> None:
    requests, replies = protocol_streams()
    serve(Worker(load_task), requests, replies)


if __name__ == "__main__":
    main()
