"""Aspect-ratio buckets (ldm.data.buckets, ldm.data.sampler.BucketSampler): kohya's bucket set and bucket of each
image against numbers derived by hand below, the resize + crop into the bucket, and the bucket-batched order."""

import numpy as np
import pytest
from PIL import Image

import ldm  # noqa: F401  (must precede mindspore)
from ldm.data import BucketSampler, BucketSpec, ImageCaptionSource
from ldm.data.synthetic import make_mixed_aspect_folder
from ldm.data.transforms import fit_to_bucket

SD = BucketSpec((512, 512))  # kohya's defaults: min 256, max 1024, steps 64
SD_NO_UPSCALE = BucketSpec((512, 512), no_upscale=True)


def test_bucket_set_small_by_hand():
    """Area 256x256, sides 128..512, steps 64. Square: floor(256 / 64) * 64 = 256. Per width w, h = min(512,
    floor(floor(65536 / w) / 64) * 64): w=128 -> 512, 192 -> 341 -> 320, 256 -> 256, 320 -> 204 -> 192,
    384 -> 170 -> 128, 448 -> 146 -> 128, 512 -> 128; each pair also transposed."""
    spec = BucketSpec((256, 256), min_reso=128, max_reso=512, steps=64)
    pairs = [(128, 512), (192, 320), (256, 256), (320, 192), (384, 128), (448, 128), (512, 128)]
    assert spec.predefined() == sorted({p for w, h in pairs for p in ((w, h), (h, w))})


def test_bucket_set_sd_defaults_by_hand():
    """Area 512x512 = 262144: w=256 -> 1024, 320 -> 819 -> 768, 384 -> 682 -> 640, 448 -> 585 -> 576, 512 -> 512,
    576 -> 455 -> 448, 640 -> 409 -> 384, 704 -> 372 -> 320, 768 -> 341 -> 320, 832..1024 -> 256."""
    heights = {256: 1024, 320: 768, 384: 640, 448: 576, 512: 512, 576: 448, 640: 384, 704: 320, 768: 320}
    heights.update({832: 256, 896: 256, 960: 256, 1024: 256})
    want = sorted({p for w, h in heights.items() for p in ((w, h), (h, w))})
    assert SD.predefined() == want and len(want) == 17


def test_bucket_set_non_square_resolution():
    """resolution 768x512 (area 393216): square floor(627.06 / 64) * 64 = 576; w=256 -> 1536 capped to 1024,
    448 -> 877 -> 832, 640 -> 614 -> 576, 1024 -> 384."""
    got = BucketSpec((768, 512)).predefined()
    for pair in [(576, 576), (256, 1024), (1024, 256), (448, 832), (832, 448), (640, 576), (1024, 384)]:
        assert pair in got
    assert (512, 512) not in got


# (width, height) -> (bucket, resized), derived by hand (comments: aspect ratio, nearest bucket ratio, scale)
PLACED = [
    ((512, 512), (512, 512), (512, 512)),  # a bucket itself
    ((1024, 1024), (512, 512), (512, 512)),  # huge square: 1.0, scale 0.5
    ((100, 100), (512, 512), (512, 512)),  # tiny square: enlarged 5.12x
    ((1000, 500), (704, 320), (704, 352)),  # 2.0 -> 2.2 (704x320); 2.0 < 2.2 so width fits: 704/1000
    ((500, 1000), (320, 704), (352, 704)),  # 0.5 -> 0.4545; height fits: 704/1000
    ((2048, 1024), (704, 320), (704, 352)),  # 2.0 again, scale 704/2048
    ((64, 32), (704, 320), (704, 352)),  # tiny landscape, enlarged 11x
    ((768, 512), (640, 384), (640, 427)),  # 1.5 -> 1.667 (err .167) not 1.286 (err .214); 426.67 + .5 -> 427
    ((512, 768), (384, 640), (427, 640)),  # 0.667 -> 0.6 (err .067) not 0.778; height fits 640/768
    ((4000, 3000), (576, 448), (597, 448)),  # 1.333 -> 1.2857; 1.333 > 1.2857 so height fits: 448/3000
    ((3000, 4000), (448, 576), (448, 597)),
    ((800, 600), (576, 448), (597, 448)),  # 1.333; 800 * 448 / 600 = 597.33 -> 597
    ((1920, 1080), (640, 384), (683, 384)),  # 1.778 -> 1.667 (err .111) not 2.2; 1920 * 384 / 1080 = 682.67 -> 683
    ((1080, 1920), (384, 640), (384, 683)),
    ((10000, 1000), (1024, 256), (2560, 256)),  # 10.0 -> 4.0, the widest bucket; height fits 256/1000
    ((1000, 10000), (256, 1024), (256, 2560)),
    ((320, 768), (320, 768), (320, 768)),  # a non-square bucket itself
    ((330, 770), (320, 768), (329, 768)),  # 0.4286 -> 0.4167 (err .012) not 0.4545; 330 * 768 / 770 = 329.1
    ((1100, 1000), (512, 512), (563, 512)),  # 1.1 -> 1.0 (err .1) not 1.2857; 1100 * 0.512 = 563.2
    ((900, 1000), (512, 512), (512, 569)),  # 0.9 -> 1.0 (err .1) not 0.778 (err .122); 1000 * 512 / 900 = 568.9
]

# bucket_no_upscale: (width, height) -> (bucket, resized)
PLACED_NO_UPSCALE = [
    ((512, 512), (512, 512), (512, 512)),  # area = max area: kept, already on the steps
    ((400, 300), (384, 256), (400, 300)),  # small: kept, bucket cut to the steps
    ((300, 200), (256, 192), (300, 200)),
    ((2000, 2000), (512, 512), (512, 512)),  # sqrt(262144) = 512 either way; equal errors take the height branch
    # ratio 2: w = sqrt(262144 * 2) = 724.08 -> 704, h of it 352 -> 320 (ratio 2.2); h = 362.04 -> 320, w of it
    # 640 (ratio 2.0, exact) -> resized (640, 320)
    ((1000, 500), (640, 320), (640, 320)),
    # ratio 4/3: w = 591.2 -> 576, h of it 432 -> 384 (1.5); h = 443.4 -> 384, w of it 512 (1.333) -> (512, 384)
    ((640, 480), (512, 384), (512, 384)),
    # ratio 3: w = 886.8 -> 832, h of it 277.3 -> 256 (3.25); h = 295.6 -> 256, w of it 768 (3.0) -> (768, 256)
    ((3000, 1000), (768, 256), (768, 256)),
    ((1000, 3000), (256, 768), (256, 768)),
]


@pytest.mark.parametrize(("size", "bucket", "resized"), PLACED, ids=[f"{w}x{h}" for (w, h), _, _ in PLACED])
def test_bucket_of_each_image(size, bucket, resized):
    placement = SD.place(*size, SD.predefined())
    assert (placement.bucket, placement.resized) == (bucket, resized)
    assert placement.resized[0] >= bucket[0] and placement.resized[1] >= bucket[1]  # covers the bucket


@pytest.mark.parametrize(
    ("size", "bucket", "resized"), PLACED_NO_UPSCALE, ids=[f"{w}x{h}" for (w, h), _, _ in PLACED_NO_UPSCALE]
)
def test_bucket_of_each_image_no_upscale(size, bucket, resized):
    placement = SD_NO_UPSCALE.place(*size)
    assert (placement.bucket, placement.resized) == (bucket, resized)
    assert resized[0] <= max(size[0], 512) and resized[1] <= max(size[1], 512)  # never enlarged


def test_no_upscale_refuses_an_image_below_one_step():
    with pytest.raises(ValueError, match="63x200 image is smaller than one bucket step"):
        SD_NO_UPSCALE.place(63, 200)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_reso": 600}, "min_bucket_reso 600 is larger than the resolution 512x512"),
        ({"max_reso": 500}, "max_bucket_reso 500 is smaller than the resolution 512x512"),
        ({"steps": 0}, "must be positive"),
    ],
)
def test_bad_bucket_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BucketSpec((512, 512), **kwargs)


def test_fit_to_bucket_resizes_then_crops_centred_or_random():
    """A 100x50 image with a ramp in x: resized to 60x30 and cropped to 48x30, centred at (60 - 48) // 2 = 6."""
    ramp = np.tile(np.arange(100, dtype=np.uint8)[None, :, None] * 2, (50, 1, 3))
    img = Image.fromarray(ramp)
    centred = fit_to_bucket(img, (60, 30), (48, 30), None, "nearest")
    resized = np.asarray(img.resize((60, 30), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(np.asarray(centred), resized[:, 6:54])
    rng = np.random.default_rng(0)
    lefts = {int(np.asarray(fit_to_bucket(img, (60, 30), (48, 30), rng, "nearest"))[0, 0, 0]) for _ in range(50)}
    assert len(lefts) > 5 and lefts <= {int(v) for v in resized[0, :13, 0]}  # offsets 0..12, several drawn


def test_bucket_sampler_batches_hold_one_bucket_and_resume(tmp_path):
    """7 landscape + 3 portrait + 2 square, batch 2 on 2 ranks: every global batch of 4 is one bucket (a bucket's
    last batch filled with its own images), each image is visited every epoch, the order is seeded and shuffled, and
    a sampler rebuilt after k batches yields the rest."""
    buckets = [(64, 32)] * 7 + [(32, 64)] * 3 + [(48, 48)] * 2
    ranks = [list(BucketSampler(buckets, 2, True, seed=3, rank=r, world_size=2, num_epochs=2)) for r in (0, 1)]
    # per epoch: ceil(7/4) + ceil(3/4) + ceil(2/4) = 4 global batches -> 4 batches of 2 per rank, 2 epochs
    assert len(ranks[0]) == len(ranks[1]) == 16
    n = len(buckets)
    for step in range(8):
        ids = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert len({buckets[i % n] for i in ids}) == 1, (step, ids)
        assert len({i // n for i in ids}) == 1  # one epoch per step
    for epoch in (0, 1):
        seen = {i % n for r in ranks for i in r if i // n == epoch}
        assert seen == set(range(n))
    patterns = {
        tuple(buckets[i] for i in list(BucketSampler(buckets, 2, True, seed=s, world_size=2))[::2]) for s in range(10)
    }
    assert len(patterns) > 3  # the order of the buckets' batches depends on the seed
    for done in range(8):
        again = BucketSampler(buckets, 2, True, seed=3, rank=1, world_size=2, num_epochs=2, batches_done=done)
        assert list(again) == ranks[1][2 * done :]


def test_source_images_have_their_bucket_shape(tmp_path):
    """A kohya folder of mixed aspect ratios: each sample is CHW in its bucket's shape (tiny-model numbers: area
    32x32, steps 8, sides 16..64: 48x32 (1.5) -> 40x24 (1.667); 32x48 -> 24x40; 40x40 -> 32x32)."""
    data = make_mixed_aspect_folder(tmp_path / "d", [(48, 32), (32, 48), (40, 40)])
    spec = BucketSpec((32, 32), min_reso=16, max_reso=64, steps=8)
    source = ImageCaptionSource(data, image_size=32, flip=True, buckets=spec)
    assert [p.bucket for p in source.placements] == [(40, 24), (24, 40), (32, 32)]
    for i, (w, h) in enumerate([(40, 24), (24, 40), (32, 32)]):
        assert source.image(i).shape == (3, h, w)


def test_no_upscale_names_an_image_smaller_than_min_bucket_reso(tmp_path, caplog):
    data = make_mixed_aspect_folder(tmp_path / "d", [(48, 32), (12, 40)])
    small = data / "1_shapes" / "0001.png"
    with pytest.raises(ValueError, match=f"{small}: 12x40 is smaller than min_bucket_reso 16"):
        ImageCaptionSource(data, buckets=BucketSpec((32, 32), min_reso=16, max_reso=64, steps=8, no_upscale=True))
    ImageCaptionSource(data, buckets=BucketSpec((32, 32), min_reso=16, max_reso=64, steps=8))
    assert "1 images are smaller than min_bucket_reso 16" in caplog.text and str(small) in caplog.text
