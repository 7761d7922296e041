"""``fedrecon client``: users of a dataset taking part in a coordinator's rounds (registered in ``cli``).

Heavy imports (TensorFlow, gRPC) happen inside the command so ``fedrecon --help`` stays fast.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console()


def client(
    task: Annotated[str, typer.Option(help="task name")],
    data: Annotated[str, typer.Option(help="'synthetic' or a MovieLens folder/file: one client per user")],
    coordinator: Annotated[str, typer.Option(help="host:port of the coordinator")] = "127.0.0.1:50051",
    users: Annotated[int, typer.Option(min=1, help="how many users of the split take part")] = 20,
    split: Annotated[str, typer.Option(help="train, validation or test users")] = "train",
    rounds: Annotated[int, typer.Option(min=1, help="rounds each client takes part in")] = 1,
    threads: Annotated[int, typer.Option(min=0, help="clients running at once (0: all of them, as real "
                                                     "devices would; fewer may starve a round)")] = 0,
    evaluate: Annotated[bool, typer.Option(help="report reconstruct-then-evaluate metrics instead")] = False,
    max_wait: Annotated[float, typer.Option(help="seconds a client waits for an assignment")] = 600.0,
    split_seed: Annotated[int, typer.Option(help="seed of the user split (as in simulate)")] = 42,
    token: Annotated[str | None, typer.Option(envvar="FEDRECON_TOKEN", help="client token, if the "
                                              "coordinator requires one")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="PEM CA that signed the coordinator's certificate: "
                                                     "connect over TLS")] = None,
) -> None:
    """Run USERS clients of a dataset against a coordinator, each as its own FederatedClient.

    With --token all users share one credential, which a coordinator counts as one device unless the token
    was issued for more (fedrecon token issue --max-devices N): its other users are then refused
    assignments or check-ins ("capped"), and the command says so."""
    import grpc

    from fedrecon.client import FederatedClient, NoAssignment, tls_credentials
    from fedrecon.server.identity import CREDENTIAL_SHARE_HINT
    from fedrecon.simulations.ratings import load_dataset

    credentials = tls_credentials(tls_ca.read_bytes()) if tls_ca else None
    dataset = load_dataset(data, seed=split_seed)
    if split not in ("train", "validation", "test"):
        raise typer.BadParameter("split must be train, validation or test")
    population = getattr(dataset, split)
    chosen = sorted(population)[:users]
    outcomes: Counter[str] = Counter()
    total = len(chosen) * (1 if evaluate else rounds)

    def run_one(user: int) -> list[str]:
        with FederatedClient(coordinator, task, f"user-{user}", population[user], token=token,
                             tls=credentials) as c:
            if evaluate:
                c.evaluate()
                return ["evaluated"]
            results = []
            for _ in range(rounds):
                try:
                    report = c.participate(max_wait_s=max_wait)
                    results.append(("accepted" if report.accepted else "already accepted") if report.in_round
                                   else f"refused ({report.status})")
                except NoAssignment as err:
                    results.append("capped" if CREDENTIAL_SHARE_HINT in str(err) else "no assignment")
                    break
                except Exception as err:  # an unreachable coordinator or a refused check-in: count it, go on
                    if isinstance(err, grpc.RpcError) and CREDENTIAL_SHARE_HINT in (err.details() or ""):
                        results.append("capped")  # the token's share is spent: asking again cannot help
                        break
                    results.append(err.code().name if hasattr(err, "code") else type(err).__name__)
            return results

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("client rounds", total=total, info="")
        with ThreadPoolExecutor(max_workers=threads or len(chosen)) as pool:
            for future in as_completed([pool.submit(run_one, u) for u in chosen]):
                for outcome in future.result():
                    outcomes[outcome] += 1
                    progress.update(bar, advance=1, info=", ".join(f"{k} {v}" for k, v in outcomes.items()))
    console.print(f"{len(chosen)} clients: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    if outcomes["capped"]:
        console.print(f"{outcomes['capped']} of {len(chosen)} users were capped: one token is one device "
                      f"unless issued for more; run {len(chosen)} users with 'fedrecon token issue "
                      f"--max-devices {len(chosen)}'.", highlight=False)
