"""The printed report: the floor, every mode's figures with their ratios to the floor, the
profile, the issue's targets and the problems."""

from __future__ import annotations

from typing import Any

from bench.procs import MIB

RSS_TARGET_MIB = 150.0


def figure(value: float | None, pattern: str) -> str:
    """A figure for the tables; "-" where there is none."""
    return "-" if value is None else pattern.format(value)


def ratio(value: float | None, floor: float | None) -> float | None:
    return value / floor if value is not None and floor else None


def floor_best(floor: dict[str, Any], name: str, key: str) -> float | None:
    entry = floor.get(name, {})
    values = [entry[k][key] for k in ("sequential", "concurrent") if k in entry]
    return max(values) if values else None


def floor_latency(floor: dict[str, Any], name: str) -> float | None:
    entry = floor.get(name, {}).get("sequential")
    return entry["latency_ms"]["p50"] if entry else None


def mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


class Floor:
    """The floor a workload's ratios use: the mean of the two measured right before and
    right after it (``floor_beside``, services mode), or else the run's first.

    The machine's speed drifts within a run, and a ratio is only as good as a floor
    measured under the same conditions as the pipeline's figure it divides."""

    def __init__(self, result: dict[str, Any], mode: str, name: str) -> None:
        self.name = name
        self.start: dict[str, Any] = result["floor"]
        wl = result["modes"].get(mode, {}).get("workloads", {}).get(name, {})
        beside = wl.get("floor_beside") or {}
        self.beside = [{name: beside[k]} for k in ("before", "after") if k in beside]
        self.entries = self.beside or [self.start]

    @property
    def where(self) -> str:
        return "beside the workload" if self.beside else "at the run's start"

    def best(self, key: str) -> float | None:
        return mean([floor_best(e, self.name, key) for e in self.entries])

    def start_best(self, key: str) -> float | None:
        return floor_best(self.start, self.name, key)

    def latency(self) -> float | None:
        return mean([floor_latency(e, self.name) for e in self.entries])

    def cpu(self) -> float | None:
        return mean([e.get(self.name, {}).get("sequential", {}).get("cpu_s_per_doc")
                     for e in self.entries])

    def services_cpu(self, process: str) -> float | None:
        return mean([e.get(self.name, {}).get("services_cpu_s_per_doc", {}).get(process)
                     for e in self.entries])


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    svc = result["modes"].get("services", {}).get("workloads", {})
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, ok: bool | None, unit: str,
            **more: Any) -> None:
        out.append({"target": name, "value": value, "limit": limit, "unit": unit,
                    "met": ok, **more})

    def against_floor(name: str, workload: str, measured: float | None, key: str,
                      limit: float) -> None:
        floor = Floor(result, "services", workload)
        best = floor.best(key)
        r = ratio(measured, best)
        add(name, r, limit, None if r is None else r >= limit, "x floor",
            floor=best, floor_measured=floor.where,
            against_start_floor=ratio(measured, floor.start_best(key)))

    small = svc.get("small", {})
    against_floor("small: sustained throughput >= 50% of the floor's", "small",
                  (small.get("sustained") or {}).get("docs_per_s"), "docs_per_s", 0.5)
    half = small.get("half") or {}
    p99 = (half.get("latency_ms", {}).get("stored") or {}).get("p99")
    add("small: p99 upload->stored < 250 ms at half the sustained rate", p99, 250.0,
        None if p99 is None else p99 < 250.0, "ms")
    p99a = (half.get("latency_ms", {}).get("accept") or {}).get("p99")
    add("small: upload 202 p99 < 50 ms at half the sustained rate", p99a, 50.0,
        None if p99a is None else p99a < 50.0, "ms")
    against_floor("large: MiB/s >= 70% of the floor's", "large",
                  (svc.get("large", {}).get("sustained") or {}).get("mib_per_s"),
                  "mib_per_s", 0.7)
    peaks = [v for w in svc.values() for role, v in (w.get("peak_rss_mib") or {}).items()
             if v is not None and role != "secantusd"]
    worst = max(peaks) if peaks else None
    add("peak RSS of every docproc process < 150 MiB", worst, RSS_TARGET_MIB,
        None if worst is None else worst < RSS_TARGET_MIB, "MiB")
    return out


def print_report(result: dict[str, Any]) -> None:
    floor = result["floor"]
    print("\n== floor (bench/floor.py), at the run's start ==")
    print(f"{'size':8} {'mode':11} {'docs/s':>8} {'MiB/s':>8} {'p50 ms':>8} {'CPU s/doc':>10}")
    for name, entry in floor.items():
        for kind in ("sequential", "concurrent"):
            if kind in entry:
                e = entry[kind]
                print(f"{name:8} {kind[:4] + ' x' + str(e['concurrency']):11} "
                      f"{e['docs_per_s']:8.1f} {e['mib_per_s']:8.1f} "
                      f"{e['latency_ms']['p50']:8.1f} {e['cpu_s_per_doc']:10.4f}")
        services = entry.get("services_cpu_s_per_doc", {})
        if services:
            print(f"{'':8} services CPU s/doc: " + ", ".join(
                f"{k} {v:.4f}" for k, v in services.items()))
    for mode, mres in result["modes"].items():
        print(f"\n== {mode} ==  (ratios: throughput / floor's best, latency / floor's "
              f"sequential p50, CPU / floor's; '!': warnings were logged during the step)")
        for name, wl in mres.get("workloads", {}).items():
            fl = Floor(result, mode, name)
            fdocs, flat, fcpu = fl.best("docs_per_s"), fl.latency(), fl.cpu()
            print(f"-- {name} ({wl['size'] / MIB:.2f} MiB, {wl['concurrency']} clients)")
            if fl.beside:
                start = fl.start_best("docs_per_s")
                near = [floor_best(e, name, "docs_per_s") for e in fl.entries]
                print("   floor beside the workload: " + ", ".join(
                    f"{when} {figure(v, '{:.1f}')} ({figure(ratio(v, start), '{:.2f}')} x the "
                    f"start's)" for when, v in zip(("before", "after"), near, strict=False))
                      + f" docs/s; ratios use their mean, {figure(fdocs, '{:.1f}')}")
            print(f"   {'step':13} {'offered':>8} {'acc/s':>7} {'stored/s':>9} {'MiB/s':>7}"
                  f" {'x fl':>5} | {'202 p50/p90/p99/max ms':>24} | "
                  f"{'stored p50/p90/p99/max ms':>26} | {'push p50/p99 ms':>16} | lag p99 |"
                  f" in DB | CPU s/doc app+db")
            for s in wl["steps"]:
                lat = s["latency_ms"]
                label = s["kind"] + (f" {s['fraction']:g}" if s["fraction"] else "")

                def q(d: dict[str, float | None], keys: tuple[str, ...]) -> str:
                    return "/".join(figure(d.get(k), "{:.0f}") for k in keys)

                if s.get("log_warnings"):
                    label += " !"
                print(f"   {label:13} {figure(s['offered_docs_per_s'], '{:.2f}'):>8} "
                      f"{figure(s['accepted_docs_per_s'], '{:.2f}'):>7} "
                      f"{figure(s['stored_docs_per_s'], '{:.2f}'):>9} "
                      f"{figure(s['stored_mib_per_s'], '{:.1f}'):>7} "
                      f"{figure(ratio(s['stored_docs_per_s'], fdocs), '{:.2f}'):>5} | "
                      f"{q(lat['accept'], ('p50', 'p90', 'p99', 'max')):>24} | "
                      f"{q(lat['stored'], ('p50', 'p90', 'p99', 'max')):>26} | "
                      f"{q(lat['push'], ('p50', 'p99')):>16} | "
                      f"{figure(lat['client_lag']['p99'], '{:.0f}'):>7} | "
                      f"{s.get('documents_in_db_before') or 0:5d} | "
                      f"{s['cpu_s_per_doc'].get('app', 0):.3f}"
                      f"+{s['cpu_s_per_doc'].get('secantusd', 0):.3f}")
            sus = wl.get("sustained") or {}
            half = wl.get("half") or {}
            hl = half.get("latency_ms", {})
            start_ratio = "" if not fl.beside else \
                f" ({figure(ratio(sus.get('docs_per_s'), fl.start_best('docs_per_s')), '{:.2f}')}" \
                " x the start's floor)"
            print(f"   sustained {figure(sus.get('docs_per_s'), '{:.2f}')} docs/s "
                  f"{figure(sus.get('mib_per_s'), '{:.1f}')} MiB/s = "
                  f"{figure(ratio(sus.get('docs_per_s'), fdocs), '{:.2f}')} x floor"
                  + start_ratio)
            if hl:
                print(f"   at half rate: p50 stored "
                      f"{figure(hl['stored']['p50'], '{:.0f}')} ms = "
                      f"{figure(ratio(hl['stored']['p50'], flat), '{:.1f}')} x floor latency; "
                      f"p99 stored {figure(hl['stored']['p99'], '{:.0f}')} ms; "
                      f"p99 202 {figure(hl['accept']['p99'], '{:.0f}')} ms; "
                      f"p99 push {figure(hl['push']['p99'], '{:.0f}')} ms")
            cpu = wl["cpu_s_per_doc"]
            fdb = fl.services_cpu("secantusd")
            db_ratio = "" if "secantusd" not in cpu else \
                f", secantusd = {figure(ratio(cpu.get('secantusd'), fdb), '{:.1f}')} x floor's"
            print("   CPU s/doc: " + ", ".join(f"{k} {v:.4f}" for k, v in cpu.items() if v)
                  + f"  (app = {figure(ratio(cpu.get('app'), fcpu), '{:.1f}')} x floor"
                  + db_ratio + ")")
            ops = [st["mongo_ops_per_doc"] for st in wl["steps"] if "mongo_ops_per_doc" in st]
            if ops:
                kinds: dict[str, list[float]] = {}
                for st in wl["steps"]:
                    for k, v in st.get("mongo_ops_per_doc_by_kind", {}).items():
                        kinds.setdefault(k, []).append(v)
                split = ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in kinds.items())
                print(f"   MongoDB operations per document: {sum(ops) / len(ops):.1f} "
                      f"({split}; the floor: 2)")
            print("   peak RSS MiB: " + ", ".join(f"{k} {v}" for k, v in
                                                  wl["peak_rss_mib"].items()))
        lp = mres.get("log_problems", {})
        if lp.get("lines") or lp.get("tracebacks"):
            print(f"   log: {lp['lines']} warning/error lines, {lp['tracebacks']} tracebacks")
            for g in lp["groups"][:8]:
                print(f"     {g['count']:5} x {g['example'][:220]}")
        prof = mres.get("profile")
        if prof and "error" not in prof:
            print(f"\n   profile of the server's gunicorn worker (py-spy, "
                  f"{prof['rate_docs_per_s']:.1f} small docs/s, worker CPU "
                  f"{prof['worker_cpu_utilisation']:.0%} of one core):")
            print("   CPU use during the pass (cores): " + ", ".join(
                f"{k} {v:.2f}" for k, v in prof["cpu_utilisation"].items() if v >= 0.005))
            titles = {"gil": "holding the GIL", "active": "all non-idle threads"}
            titles.update({kind: f"{kind.removesuffix('-gil')}, holding the GIL"
                           for kind in prof if kind.startswith("worker-")})
            titles["secantusd-gil"] = "the SecantusDB server, holding the GIL"
            for kind, title in titles.items():
                if kind not in prof:
                    continue
                p = prof.get(kind, {})
                if "self" not in p:
                    print(f"   {kind}: {p.get('error')}")
                    continue
                print(f"   [{title}: {p['samples']} samples]")
                print("   by library/module (self): " + ", ".join(
                    f"{a['frame']} {a['share']:.0%}" for a in p["by_area_self"][:10]))
                print("   by library/module (inclusive): " + ", ".join(
                    f"{a['frame']} {a['share']:.0%}" for a in p["by_area_inclusive"][:14]))
                print("   top self:")
                for f in p["self"][:12]:
                    print(f"     {f['share']:6.1%}  {f['frame'][:110]}")
                print("   top project frames (inclusive):")
                for f in p["project_inclusive"][:12]:
                    print(f"     {f['share']:6.1%}  {f['frame'][:110]}")
        elif prof:
            print(f"   profile: {prof.get('error')}")
    print("\n== targets (services mode) ==")
    for t in result["targets"]:
        state = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        against = "" if t.get("floor_measured") != "beside the workload" else \
            f"; {figure(t.get('against_start_floor'), '{:.2f}')} x the start's floor"
        print(f"  {state:6} {t['target']}: {figure(t['value'], '{:.2f}')} {t['unit']} "
              f"(limit {t['limit']:g}{against})")
    if result["problems"]:
        print("\n== problems ==")
        for p in result["problems"][:30]:
            print("  " + p)
