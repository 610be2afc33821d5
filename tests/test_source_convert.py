"""Both colour conversions give the same picture; OpenCV's is the one that releases the GIL."""

import av
import numpy as np

from conftest import PERSON_CLIP
from stages.source import to_bgr


def test_opencv_conversion_matches_swscale_closely():
    with av.open(str(PERSON_CLIP)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == 30:
                break
    reference = to_bgr(frame, "swscale")
    fast = to_bgr(frame, "opencv")
    assert fast.shape == reference.shape == (432, 768, 3) and fast.dtype == np.uint8
    difference = np.abs(fast.astype(int) - reference.astype(int))
    assert difference.mean() < 2.0 and np.percentile(difference, 99) <= 8
    assert not np.array_equal(fast, reference)  # it really is the other converter
