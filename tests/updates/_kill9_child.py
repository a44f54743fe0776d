"""Run by test_kill9.py, which kills it (SIGKILL) at a random moment: pull, install and roll back in a loop, then
commit. Prints ``ready`` once its imports are done, so the kill lands in the updater's work, not in start-up."""

from __future__ import annotations

import sys

from edgeshield import keys, updates


def main() -> None:
    device_dir, url, device_key, cycles = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    key = keys.load_device_private_key(device_key)
    print("ready", flush=True)
    with updates.DeviceUpdater(device_dir, device_key=key, lock_timeout_s=5.0) as u:
        for _ in range(cycles):
            u.pull(url)
            u.install()
            u.rollback()
        u.pull(url)
        u.install(commit=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
