"""Run under torchrun (gloo, 3 ranks): core.file_transfer in a ring, as buddy copies use it.

Each rank sends a folder to the next rank and receives the previous one's, all at once; the folders
differ in file count and size (rank 1 sends nothing), and files span several chunks. Then a name
that would leave the receiving folder, and a file that cannot be written, are refused without
putting the pair out of step. Exits non-zero with a message on the first fault."""
from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist

from core import file_transfer
from core.file_transfer import FolderOffer, TransferError, exchange, offer_folder


def contents(rank: int) -> dict[str, bytes]:
    """The files rank `rank` sends: none from rank 1; an empty one, nested ones, several chunks."""
    if rank == 1:
        return {}
    rng = random.Random(rank)
    sizes = {"empty": 0, "a.bin": 3 * file_transfer.CHUNK + 7, "sub/b.bin": rank * 1000 + 1, "COMMITTED": 0}
    return {name: bytes(rng.getrandbits(8) for _ in range(size)) for name, size in sizes.items()}


def fail(what: str) -> None:
    print(f"[rank {dist.get_rank()}] FAULT: {what}", flush=True)
    sys.exit(1)


def main() -> None:
    file_transfer.CHUNK = 1000  # many chunks, interleaved both ways
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = sys.argv[1]
    mine, into = os.path.join(root, f"from{rank}"), os.path.join(root, f"at{rank}")
    for name, data in contents(rank).items():
        os.makedirs(os.path.dirname(os.path.join(mine, name)), exist_ok=True)
        with open(os.path.join(mine, name), "wb") as f:
            f.write(data)
    os.makedirs(into)
    offer, fds = offer_folder(mine, sorted(contents(rank)), {"from": rank})
    got = exchange(dist.group.WORLD, (rank + 1) % world, offer, fds, (rank - 1) % world, into)
    sent = contents((rank - 1) % world)
    if got.meta != {"from": (rank - 1) % world} or dict(got.files) != {n: len(d) for n, d in sent.items()}:
        fail(f"offer {got}")
    for name, data in sent.items():
        with open(os.path.join(into, name), "rb") as f:
            if f.read() != data:
                fail(f"{name} arrived changed")
    if not sent and os.listdir(into):
        fail(f"nothing was sent, yet {os.listdir(into)} arrived")

    # Refused on the receiving side (a name outside the folder; a file that cannot be written): every
    # byte is still received, so the next transfer between the same two ranks is whole.
    blocked = os.path.join(root, "not_a_folder")
    with open(blocked, "wb"):
        pass
    payload = contents(0)["a.bin"]
    with open(os.path.join(root, "payload"), "wb") as f:
        f.write(payload)
    for name, into, why in (("../escape", os.path.join(root, "unsafe"), "outside the folder"),
                            ("x/a.bin", blocked, "could not be written"), ("a.bin", os.path.join(root, "after"), None)):
        if rank == 0:
            _, fds = offer_folder(root, ["payload"], {})
            exchange(dist.group.WORLD, 1, FolderOffer([(name, len(payload))]), fds)
            os.close(fds[0])
        elif rank == 1:
            if into != blocked:
                os.makedirs(into, exist_ok=True)
            try:
                exchange(dist.group.WORLD, take_from=0, into=into)
                if why is not None:
                    fail(f"{name} into {into} was accepted")
                with open(os.path.join(into, name), "rb") as f:
                    if f.read() != payload:
                        fail("the transfer after the refused ones arrived changed")
            except TransferError as e:
                if why is None or why not in str(e):
                    fail(str(e))
        if os.path.exists(os.path.join(root, "escape")):
            fail("a file was written outside the folder")
    dist.barrier()
    print(f"[rank {rank}] ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
