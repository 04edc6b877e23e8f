"""Drawing the synthetic dataset's images: coloured circles, squares and triangles on black.

Not in the reference (it has no built-in data). An image is a 3x3 grid of cells, each holding at
most one shape; shapes are drawn without anti-aliasing in four pure colours and never touch
(a gap of at least 2 px), so the picture can be read back exactly from its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 220),
    "yellow": (230, 200, 40),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (0, 0, 0)
GRID = 3
MIN_IMAGE_SIZE = 24


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    cell: int  # 0..8, row-major in the 3x3 grid
    jitter: tuple[int, int] = (0, 0)  # (dx, dy) in {0, 1}: where in its cell the shape sits


def shape_box(shape: Shape, size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of a shape in an image of `size` px."""
    cell = size // GRID
    extent = cell - 3  # leaves 1 px before, up to 1 px of jitter and >= 1 px after, inside the cell
    row, col = divmod(shape.cell, GRID)
    x0 = col * cell + 1 + shape.jitter[0]
    y0 = row * cell + 1 + shape.jitter[1]
    return x0, y0, x0 + extent - 1, y0 + extent - 1


def draw_shapes(shapes: tuple[Shape, ...] | list[Shape], size: int = 32) -> Image.Image:
    """An RGB image of `size` px with the shapes drawn."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"synthetic images need at least {MIN_IMAGE_SIZE} px, got {size}")
    cells = [s.cell for s in shapes]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two shapes share a cell: {cells}")
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        x0, y0, x1, y1 = shape_box(s, size)
        fill = COLOURS[s.colour]
        if s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s.kind!r}; known: {SHAPES}")
    return img
