"""Small, real ALFWorld games written by hand, for tests, demos and docs.

The ALFWorld game files (`json_2.1.1/...`) come from `alfworld-download`, which needs GitHub. These
games are built instead from the domain and grammar that ship inside the `alfworld` package
(`alfworld/data/alfred.pddl`, `alfred.twl2`) plus hand-written PDDL problems, in the exact layout of
the downloaded data::

    <root>/json_2.1.1/<split>/<task_type>-<Obj>-<Mrecep>-<Recep>-<scene>/trial_<id>/{traj_data.json,game.tw-pddl}

so `ALFWorldFactory(data_path=root)` plays them exactly like real games (same engine, same demangled
names, same goal templates, the built-in experts solve them). Call `write_sample_games(root)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# Object / receptacle types every problem declares: the domain refers to some of them as constants
# (SinkBasinType, MicrowaveType, FridgeType), and the goals refer to the target types.
_OTYPES = ("Apple", "Book", "CellPhone", "DeskLamp", "Mug", "Potato", "Tomato")
_RTYPES = ("Cabinet", "CounterTop", "Desk", "DiningTable", "Drawer", "Fridge", "Microwave", "Shelf", "SinkBasin")
_OPENABLE = {"Cabinet", "Drawer", "Fridge", "Microwave"}
# canContain facts: which receptacle type may hold which object type (a subset of ALFRED's table).
_CAN_CONTAIN = {
    "Cabinet": ("Apple", "Book", "CellPhone", "Mug", "Potato", "Tomato"),
    "CounterTop": ("Apple", "Book", "CellPhone", "Mug", "Potato", "Tomato"),
    "Desk": ("Book", "CellPhone", "DeskLamp", "Mug"),
    "DiningTable": ("Apple", "Book", "CellPhone", "Mug", "Potato", "Tomato"),
    "Drawer": ("Book", "CellPhone"),
    "Fridge": ("Apple", "Mug", "Potato", "Tomato"),
    "Microwave": ("Apple", "Mug", "Potato", "Tomato"),
    "Shelf": ("Book", "CellPhone", "Mug"),
    "SinkBasin": ("Apple", "Mug", "Potato", "Tomato"),
}
_PROPS = {  # object properties, as in ALFRED's scene metadata
    "Apple": ("pickupable", "heatable", "coolable"),
    "Book": ("pickupable",),
    "CellPhone": ("pickupable",),
    "DeskLamp": ("toggleable",),
    "Mug": ("pickupable", "cleanable", "heatable", "coolable", "isReceptacleObject"),
    "Potato": ("pickupable", "heatable", "coolable", "cleanable"),
    "Tomato": ("pickupable", "heatable", "coolable", "cleanable"),
}


def _num(v: float) -> str:
    sign = "_plus_" if v >= 0 else "_minus_"
    return sign + f"{abs(v):05.2f}".replace(".", "_dot_")


def _mangle(kind: str, xyz: tuple[float, float, float], suffix: str = "") -> str:
    """An ALFRED-style entity id (`Apple|+00.10|+01.00|-00.50`, mangled like the released games)."""
    name = kind + "".join("_bar_" + _num(v) for v in xyz)
    return name + (f"_bar_{suffix}" if suffix else "")


@dataclass
class _Game:
    split: str
    task_type: str
    scene: int
    trial: str
    pddl_params: dict
    # receptacles: (type, xyz, location); location = "loc_bar_<i>..." names the spot in front of it
    receptacles: list[tuple[str, tuple[float, float, float], str]]
    # objects: (type, xyz, receptacle index)
    objects: list[tuple[str, tuple[float, float, float], int]]
    start: str = "loc_bar_0_bar_0_bar_0_bar_30"
    extra_init: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        p = self.pddl_params
        return f"{self.task_type}-{p['object_target']}-{p['mrecep_target'] or 'None'}-{p['parent_target'] or 'None'}-{self.scene}"


def _kitchen(split, task_type, scene, trial, params, objects, extra=None) -> _Game:
    recs = [
        ("CounterTop", (0.5, 1.0, -1.0), "loc_bar_1_bar__minus_1_bar_1_bar_45"),
        ("DiningTable", (-1.5, 0.8, 1.0), "loc_bar__minus_1_bar_1_bar_3_bar_60"),
        ("Cabinet", (1.2, 2.0, -1.3), "loc_bar_2_bar__minus_2_bar_2_bar_0"),
        ("Fridge", (-2.0, 0.0, -1.5), "loc_bar__minus_2_bar__minus_1_bar_2_bar_60"),
        ("Microwave", (0.9, 1.6, -1.4), "loc_bar_3_bar__minus_1_bar_2_bar_0"),
        ("SinkBasin", (-0.4, 0.9, -1.2), "loc_bar_0_bar__minus_2_bar_2_bar_45"),
    ]
    return _Game(split, task_type, scene, trial, params, recs, objects, extra_init=extra or [])


def _bedroom(split, task_type, scene, trial, params, objects) -> _Game:
    recs = [
        ("Desk", (1.0, 0.0, 1.5), "loc_bar_4_bar_5_bar_1_bar_45"),
        ("Drawer", (1.3, 0.4, 1.4), "loc_bar_5_bar_4_bar_1_bar_45"),
        ("Shelf", (-1.8, 1.2, 0.2), "loc_bar__minus_4_bar_0_bar_3_bar_30"),
    ]
    return _Game(split, task_type, scene, trial, params, recs, objects)


def _params(obj, recep="", toggle="", mrecep="") -> dict:
    return {
        "object_target": obj,
        "parent_target": recep,
        "toggle_target": toggle,
        "mrecep_target": mrecep,
        "object_sliced": False,
    }


#: The sample games: two training games of different types, one IID (valid_seen) and one OOD
#: (valid_unseen) game. Small on purpose: the built-in experts solve each in a handful of steps.
SAMPLE_GAMES: tuple[_Game, ...] = (
    _kitchen(
        "train",
        "pick_and_place_simple",
        1,
        "T20261123_000001_000001",
        _params("Apple", recep="Fridge"),
        [("Apple", (0.4, 1.1, -0.9), 1), ("Mug", (-1.4, 0.9, 1.1), 1), ("Tomato", (0.6, 1.1, -1.0), 0)],
    ),
    _kitchen(
        "train",
        "pick_clean_then_place_in_recep",
        2,
        "T20261123_000002_000002",
        _params("Mug", recep="Cabinet"),
        [("Mug", (0.3, 1.0, -1.1), 0), ("Apple", (-1.6, 0.9, 0.9), 1)],
    ),
    _kitchen(
        "valid_seen",
        "pick_heat_then_place_in_recep",
        3,
        "T20261123_000003_000003",
        _params("Potato", recep="DiningTable"),
        [("Potato", (-1.9, 0.5, -1.4), 3), ("Mug", (0.2, 1.0, -1.0), 0)],
    ),
    _bedroom(
        "valid_unseen",
        "look_at_obj_in_light",
        4,
        "T20261123_000004_000004",
        _params("Book", toggle="DeskLamp"),
        [("Book", (-1.7, 1.3, 0.1), 2), ("DeskLamp", (1.1, 0.8, 1.6), 0), ("CellPhone", (1.2, 0.5, 1.4), 1)],
    ),
)


def _problem(game: _Game) -> str:
    from alfworld.gen import goal_library

    # ALFRED names a sink basin `Sink|x|y|z|SinkBasin`; the demangler turns it into "sinkbasin 1".
    rec_ids = [
        _mangle("Sink", xyz, "SinkBasin") if t == "SinkBasin" else _mangle(t, xyz) for t, xyz, _ in game.receptacles
    ]
    obj_ids = [_mangle(t, xyz) for t, xyz, _ in game.objects]
    locs = sorted({loc for _, _, loc in game.receptacles} | {game.start})
    lines = ["(define (problem plan_trial_" + game.trial + ")", "(:domain alfred)", "(:objects", "agent1 - agent"]
    lines += [f"{t}Type - otype" for t in _OTYPES]
    lines += [f"{t}Type - rtype" for t in _RTYPES]
    lines += [f"{o} - object" for o in obj_ids]
    lines += [f"{r} - receptacle" for r in rec_ids]
    lines += [f"{loc} - location" for loc in locs]
    lines += [")", "(:init", f"(atLocation agent1 {game.start})"]
    for (t, _, loc), rid in zip(game.receptacles, rec_ids):
        lines.append(f"(receptacleType {rid} {t}Type)")
        lines.append(f"(receptacleAtLocation {rid} {loc})")
        if t in _OPENABLE:
            lines.append(f"(openable {rid})")
    for rt in sorted({t for t, _, _ in game.receptacles}):
        lines += [f"(canContain {rt}Type {ot}Type)" for ot in _CAN_CONTAIN[rt]]
    for (t, _, ridx), oid in zip(game.objects, obj_ids):
        lines.append(f"(objectType {oid} {t}Type)")
        lines.append(f"(inReceptacle {oid} {rec_ids[ridx]})")
        lines.append(f"(objectAtLocation {oid} {game.receptacles[ridx][2]})")
        lines += [f"({prop} {oid})" for prop in _PROPS[t]]
    lines += game.extra_init
    lines.append(")")
    p = game.pddl_params
    goal = goal_library.gdict[game.task_type]["pddl"].format(
        obj=p["object_target"], recep=p["parent_target"], toggle=p["toggle_target"], mrecep=p["mrecep_target"]
    )
    # ALFRED's goal library writes typed variables as `?x # type`; the PDDL parser wants `?x - type`.
    return "\n".join(lines) + "\n" + goal.replace(" # ", " - ")


def _goal_text(game: _Game) -> str:
    from alfworld.gen import goal_library

    p = game.pddl_params
    template = goal_library.gdict[game.task_type]["templates"][0]  # first template: deterministic text
    return template.format(
        obj=p["object_target"].lower(),
        recep=p["parent_target"].lower(),
        toggle=p["toggle_target"].lower(),
        mrecep=p["mrecep_target"].lower(),
    )


def write_sample_games(root: str | os.PathLike, games: tuple[_Game, ...] = SAMPLE_GAMES) -> list[str]:
    """Write the sample games under `root` (an `$ALFWORLD_DATA`-like folder); return the game folders.

    Needs the `alfworld` package (for its domain, grammar and goal templates). Idempotent.
    """
    try:
        import alfworld
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("Writing ALFWorld games needs the alfworld package: pip install epo-trl[alfworld]") from e

    data_dir = os.path.join(os.path.dirname(alfworld.__file__), "data")
    with open(os.path.join(data_dir, "alfred.pddl")) as f:
        domain = f.read()
    with open(os.path.join(data_dir, "alfred.twl2")) as f:
        grammar = f.read()

    folders = []
    for game in games:
        folder = os.path.join(str(root), "json_2.1.1", game.split, game.folder, "trial_" + game.trial)
        os.makedirs(folder, exist_ok=True)
        goal = _goal_text(game)
        traj = {
            "task_type": game.task_type,
            "task_id": "trial_" + game.trial,
            "scene": {"floor_plan": f"FloorPlan{game.scene}", "scene_num": game.scene},
            "pddl_params": game.pddl_params,
            "turk_annotations": {"anns": [{"task_desc": goal, "high_descs": [], "assignment_id": "sample"}]},
            "epo_trl_sample": True,
        }
        # Released games carry the goal already filled into their grammar (AlfredTWEnv does not add it).
        tw_pddl = {
            "pddl_domain": domain,
            "grammar": grammar.replace("UNKNOWN GOAL", goal),
            "pddl_problem": _problem(game),
            "solvable": True,
        }
        with open(os.path.join(folder, "traj_data.json"), "w") as f:
            json.dump(traj, f, indent=2)
        with open(os.path.join(folder, "game.tw-pddl"), "w") as f:
            json.dump(tw_pddl, f)
        folders.append(folder)
    return folders
