"""Where each step of a workflow goes when its pages draw it: a layered layout of the DAG,
plain data that a template turns into SVG (no JavaScript, no layout library).

A step's column is its depth (0 for a step that depends on nothing, else one more than its
deepest dependency), so every edge points right; within a column, steps keep the order of the
definition, and each column is centred on the tallest one. Edges are cubic curves from the
right side of a step to the left side of its dependent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

NODE_WIDTH = 184
NODE_HEIGHT = 66
COLUMN_GAP = 56
ROW_GAP = 18
MARGIN = 8
LABEL_CHARS = 22  # what fits on a node's first line at the pages' font size


@dataclass(frozen=True)
class NodeBox:
    step_id: str
    column: int
    row: int
    x: int
    y: int
    label: str  # the step id, shortened to fit its box (the full id is in the node's title)

    width: int = NODE_WIDTH
    height: int = NODE_HEIGHT


@dataclass(frozen=True)
class EdgePath:
    source: str
    target: str
    path: str  # SVG path data


@dataclass(frozen=True)
class Layout:
    nodes: list[NodeBox]
    edges: list[EdgePath]
    width: int
    height: int
    columns: int


def short_label(text: str, limit: int = LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def step_depths(dependencies: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each step's depth. A dependency that is not a step is left out; a cycle (a saved
    definition has none) is cut where it closes rather than followed forever."""
    depths: dict[str, int] = {}
    visiting: set[str] = set()

    def depth(step_id: str) -> int:
        if step_id in depths:
            return depths[step_id]
        visiting.add(step_id)
        upstream = [d for d in dependencies[step_id] if d in dependencies and d not in visiting]
        value = 1 + max(map(depth, upstream)) if upstream else 0
        visiting.discard(step_id)
        depths[step_id] = value
        return value

    for step_id in dependencies:
        depth(step_id)
    return depths


def graph_layout(dependencies: Mapping[str, Sequence[str]]) -> Layout:
    """The layout of the steps ``dependencies`` names (step id → the ids it depends on, in the
    definition's order)."""
    depths = step_depths(dependencies)
    columns: list[list[str]] = []
    for step_id in dependencies:
        column = depths[step_id]
        while len(columns) <= column:
            columns.append([])
        columns[column].append(step_id)
    tallest = max((len(column) for column in columns), default=0)
    pitch_x, pitch_y = NODE_WIDTH + COLUMN_GAP, NODE_HEIGHT + ROW_GAP
    boxes: dict[str, NodeBox] = {}
    for index, column in enumerate(columns):
        offset = (tallest - len(column)) * pitch_y // 2
        for row, step_id in enumerate(column):
            boxes[step_id] = NodeBox(
                step_id=step_id,
                column=index,
                row=row,
                x=MARGIN + index * pitch_x,
                y=MARGIN + offset + row * pitch_y,
                label=short_label(step_id),
            )
    edges = [
        EdgePath(source=dep, target=step_id, path=_curve(boxes[dep], boxes[step_id]))
        for step_id, upstream in dependencies.items()
        for dep in dict.fromkeys(upstream)
        if dep in boxes and depths[dep] < depths[step_id]
    ]
    width = MARGIN * 2 + len(columns) * pitch_x - COLUMN_GAP if columns else 0
    height = MARGIN * 2 + tallest * pitch_y - ROW_GAP if columns else 0
    return Layout(nodes=list(boxes.values()), edges=edges, width=width, height=height, columns=len(columns))


def _curve(source: NodeBox, target: NodeBox) -> str:
    x1, y1 = source.x + source.width, source.y + source.height // 2
    x2, y2 = target.x, target.y + target.height // 2
    bend = (x2 - x1) // 2
    return f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"
