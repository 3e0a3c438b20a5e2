"""How far could FID drop for a held-out colour treatment, given the shapes the base model draws?

    python tools/tiny_sd/concept_bound.py --real_dir output/tiny_sd_data/blueprint_test \
        --samples output/clipart_samples --out tools/tiny_sd/sweep/concept_bound.json

``--samples``: base-model samples for the held-out test subjects captioned as ordinary clip art (``text_to_image.py``
with the demo's prompts where "a blueprint drawing of" reads "a clip art drawing of"). ``--real_dir``: the held-out
test images of ``make_data.py`` (``--concept`` names their treatment). Each treatment below is a function of a drawing's
ink (``make_data.ink``, its darkness), so the test images' ink is read back (``ink_of``) and redrawn in every
treatment. Per treatment: FID of the samples as drawn ("before") and of the samples redrawn in the treatment
("bound": a perfect style adapter on this model's shapes) against the redrawn test images. A concept is worth
holding out for the demo only if its bound leaves room for the drop the demo aims at. MindSpore on the CPU: ~10 min.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from make_data import CONCEPTS, HELD_OUT, ink, paint

import ldm  # noqa: F401  (CPU defaults before mindspore)
from ldm.atomic import write_json

TREATMENTS = {  # name: (paper RGB, ink RGB)
    **{name: spec[1:] for name, spec in CONCEPTS.items()},
    "red_ink": ((255, 255, 255), (200, 20, 20)),
    "sepia": ((240, 225, 190), (90, 55, 25)),
    "negative": ((0, 0, 0), (255, 255, 255)),
    "pencil": ((255, 255, 255), (60, 60, 60)),
    "orange_paper": ((250, 150, 30), (60, 20, 0)),
}


def ink_of(images: np.ndarray, concept: str) -> np.ndarray:
    """Inverse of ``make_data.treat`` for ``concept``, read on the channel where its ink and paper differ most."""
    _, paper, colour = CONCEPTS[concept]
    c = int(np.argmax(np.abs(np.subtract(colour, paper, dtype=np.float32))))
    return np.clip((images[..., c].astype(np.float32) - paper[c]) / (colour[c] - paper[c]), 0.0, 1.0)[..., None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real_dir", required=True, help="held-out test images (make_data.py's <concept>_test/)")
    p.add_argument("--concept", default=HELD_OUT, choices=sorted(CONCEPTS), help="the treatment of --real_dir")
    p.add_argument("--samples", required=True, help="base-model samples of the same subjects as clip art")
    p.add_argument("--out", required=True, help="JSON of before / bound / relative drop per treatment")
    p.add_argument("--treatments", default=",".join(TREATMENTS), help="comma-separated names (default: all)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.treatments.split(",")) - set(TREATMENTS))
    if unknown:
        p.error(f"--treatments: unknown {', '.join(unknown)} (known: {', '.join(TREATMENTS)})")

    import mindspore as ms

    from ldm.metrics.fid import FIDError, batch_features, fid_from_features, image_set, load_rgb
    from ldm.metrics.fid_weights import load_fid_inception

    try:
        real = ink_of(np.stack([load_rgb(f) for f in image_set(args.real_dir, "real")]), args.concept)
        drawn = np.stack([load_rgb(f) for f in image_set(args.samples, "generated")])
    except FIDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ms.set_context(mode=ms.GRAPH_MODE)
    net = load_fid_inception()

    def features(images: np.ndarray, batch: int = 16) -> np.ndarray:
        return np.concatenate([batch_features(net, images[i : i + batch], batch) for i in range(0, len(images), batch)])

    as_drawn, drawn_ink = features(drawn), ink(drawn)
    results = {"real": len(real), "samples": len(drawn)}
    for name in args.treatments.split(","):
        paper, colour = TREATMENTS[name]
        reference = features(paint(real, paper, colour))
        before = fid_from_features(as_drawn, reference)
        bound = fid_from_features(features(paint(drawn_ink, paper, colour)), reference)
        results[name] = {"before": round(before, 2), "bound": round(bound, 2), "drop": round(1 - bound / before, 4)}
        print(name, results[name], flush=True)
    write_json(args.out, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
