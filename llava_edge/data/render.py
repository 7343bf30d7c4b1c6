"""Drawing a synthetic scene with Pillow: each shape filled inside its bounding box."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .world import BACKGROUNDS, COLORS, Scene


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of ``scene.image_size`` pixels square."""
    size = scene.image_size
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.bbox
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.shape == "triangle":  # pointing up, base along the bottom of the box
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
        else:
            raise ValueError(f"no drawing for shape {s.shape!r}")
    return image
