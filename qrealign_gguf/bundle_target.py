"""What `package --target` adds to a bundle: llama.cpp built for the device and a run.sh that starts the model.

    <stem>/bin/llama-completion   static (nothing to install on the device), the patched flavour when the GGUF
                                  has qrealign's custom tensor types, else stock
    <stem>/run.sh                 POSIX sh: checks the machine and CPU features, then starts llama-completion
                                  (a chat, or one greedy answer to a prompt)

The programs come from tools/build/build_llama_static.sh (llamacpp/static.py), built on first use and cached.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .llamacpp import static
from .progress import Log

BINARIES = ("llama-completion",)


@dataclass(frozen=True)
class DeviceRuntime:
    target: static.Target
    flavour: str  # "patched" or "stock"
    binaries: tuple[Path, ...]  # bundled as bin/<name>
    build_info: dict[str, str]  # the build's compiler and flags (its BUILDINFO file)

    def provenance(self) -> dict:
        return {"name": self.target.name, "machine": self.target.machine, "cpu_flags": list(self.target.cpu_flags),
                "llama_cpp": self.flavour, "static": True, "programs": [f"bin/{b.name}" for b in self.binaries],
                "build": self.build_info}


def check_target(name: str) -> static.Target:
    """The target, its compiler present: InputError otherwise (before anything is read or written)."""
    t = static.target(name)
    static.check_toolchain(t)
    return t


def device_runtime(t: static.Target, custom_types: bool, log: Log | None = None) -> DeviceRuntime:
    """The static llama.cpp for the target, built on first use (minutes: said through `log` first, so a quiet
    terminal does not look hung)."""
    flavour = "patched" if custom_types else "stock"
    try:
        prefix = static.static_prefix(flavour, t, build=False)
    except FileNotFoundError:
        if log is not None:
            log(f"building llama.cpp ({flavour}, static) for {t.name} once; it is cached for the next bundle "
                f"(~{static.BUILD_MINUTES} CPU-minutes)")
        prefix = static.static_prefix(flavour, t)
    info = {}
    if (prefix / "BUILDINFO").is_file():
        info = dict(ln.split("=", 1) for ln in (prefix / "BUILDINFO").read_text().splitlines() if "=" in ln)
    return DeviceRuntime(t, flavour, tuple(prefix / "bin" / b for b in BINARIES), info)


def run_sh(rt: DeviceRuntime, gguf: str, has_chat_template: bool) -> str:
    """The bundle's start script. POSIX sh (busybox devices have no bash); the checks turn "Illegal instruction"
    or "Exec format error" into a sentence."""
    t = rt.target
    template = "" if has_chat_template else " --chat-template chatml"  # the card's advice for files without one
    machines = {"aarch64": "aarch64|arm64", "x86_64": "x86_64|amd64"}.get(t.machine, t.machine)
    flags = " ".join(t.cpu_flags)
    return f"""#!/bin/sh
# Starts {gguf} with the llama.cpp in bin/ (static, {rt.flavour}; built for {t.name}: {t.describe}).
# Nothing else needs to be installed.
#   ./run.sh                   a chat in the terminal (Ctrl-C quits)
#   ./run.sh "PROMPT" [OPT...] one answer to PROMPT (greedy, at most 256 tokens), then exit; llama-completion
#                              options may follow, e.g. -n 64 (answer length), -t 4 (threads), --temp 0.7
# Through an emulator on another machine (a test, not for speed): EMULATOR=qemu-aarch64 ./run.sh "PROMPT"
set -e
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
if [ -z "${{EMULATOR:-}}" ]; then
  machine=$(uname -m)
  case "$machine" in
    {machines}) ;;
    *) echo "run.sh: this llama.cpp is built for {t.machine} ({t.name}), this machine is $machine; package the model with --target for it" >&2
       exit 2 ;;
  esac
  for flag in {flags}; do
    if [ -r /proc/cpuinfo ] && ! grep -qw "$flag" /proc/cpuinfo; then
      echo "run.sh: this CPU lacks '$flag', which this build of llama.cpp needs ({t.describe})" >&2
      exit 2
    fi
  done
fi
# EMULATOR is a command with its options (qemu-aarch64 -cpu cortex-a76): split on purpose
if [ $# -eq 0 ]; then
  exec ${{EMULATOR:-}} "$here/bin/llama-completion" -m "$here/{gguf}" -cnv{template}
fi
prompt=$1
shift
# at most 256 tokens unless the options say otherwise (llama.cpp warns about a repeated -n)
limit="-n 256"
for arg in "$@"; do
  case "$arg" in -n|--n-predict|--predict|-n=*|--n-predict=*|--predict=*) limit="" ;; esac
done
exec ${{EMULATOR:-}} "$here/bin/llama-completion" -m "$here/{gguf}" -cnv -st -p "$prompt" --temp 0 $limit \\
  --no-display-prompt{template} "$@"
"""


def card_lines(prov: dict) -> list[str]:
    """The model card's Run section for a bundle that carries its llama.cpp."""
    tp = prov["target"]
    custom = prov["custom_types"]
    lines = [f"This bundle carries llama.cpp built for **{tp['name']}** ({tp['machine']}; static, nothing to install"
             + (f"; needs the CPU feature{'s' if len(tp['cpu_flags']) > 1 else ''} {', '.join(tp['cpu_flags'])}"
                if tp["cpu_flags"] else "") + ")"
             + (f", with qrealign-gguf's patches for {', '.join(custom)}" if custom else "") + ". On the device:", "",
             "```", "sha256sum -c SHA256SUMS", "./run.sh \"Write a haiku about the sea\"   # one answer",
             "./run.sh                                   # a chat in the terminal", "```", ""]
    return lines
