import numpy as np
import pytest
import tensorflow_datasets as tfds

from sparsejax.data import imagenet
from sparsejax.data.errors import DatasetNotFoundError
from sparsejax.data.sources import open_imagenet, open_source
from sparsejax.train.input import Input
from sparsejax.train.sharding import create_mesh


def test_random_resized_crop_boxes_stay_inside_and_follow_the_ranges():
    rng = np.random.default_rng(0)
    height, width = 300, 400
    boxes = np.array([imagenet.random_resized_crop_box(height, width, rng) for _ in range(2000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert area.min() >= 0.07 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert 0.3 < np.median(area) < 0.7  # area fraction ~ U(0.08, 1), rejections aside


def test_fallback_is_the_central_crop_of_a_clamped_aspect_ratio():
    class NeverFits:
        def uniform(self, low, high):
            return high if low > 0 else 0.0

        def integers(self, low, high):
            raise AssertionError("no random position for the fallback")

    # area 1.0 of a 10x1000 strip with ratio 1: never fits, so the fallback crops 10 x 13.
    assert imagenet.random_resized_crop_box(10, 1000, NeverFits()) == (0, 493, 10, 13)


def test_eval_image_resizes_the_shorter_side_and_crops_the_center():
    image = np.zeros((256, 512, 3), np.uint8)
    image[:, 256 - 112 : 256 + 112] = 200  # the central 224 columns
    out = imagenet.eval_image(image)
    assert out.shape == (224, 224, 3)
    assert (out[16:-16] == 200).all()


def test_train_image_is_224_rgb_even_for_grayscale_input():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (50, 80, 1), dtype=np.uint8)
    out = imagenet.train_image(gray, rng)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_normalize_uses_the_imagenet_statistics():
    pixel = np.full((1, 1, 1, 3), 255, np.uint8)
    np.testing.assert_allclose(imagenet.normalize(pixel).ravel(), (1 - imagenet.MEAN) / imagenet.STD)




@pytest.mark.usefixtures("getitems_by_index")
def test_imagenet_pipeline_under_mock_data():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        source = open_imagenet(data_dir=None, num_train=None, num_test=5)
        inputs = Input(source, create_mesh(), batch_size=4, eval_batch_size=4, steps_per_epoch=3)
        train = [tuple(np.asarray(a) for a in b) for b in inputs.train_batches(0, 4)]
        evaluation = [tuple(np.asarray(a) for a in b) for b in inputs.eval_batches()]
    assert source.num_classes == 1000 and source.num_train == 12 and source.num_test == 5
    assert len(train) == 4 and train[0][0].shape == (4, 224, 224, 3)
    assert train[0][0].dtype == np.float32 and train[0][1].dtype == np.int32
    assert len(evaluation) == 2 and evaluation[1][2].tolist() == [True, False, False, False]
    assert abs(float(train[0][0].mean())) < 2.5  # normalised, not raw pixels


def test_unprepared_imagenet_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="downloads/manual.*tfds build imagenet2012"):
        open_source("imagenet2012", data_dir=str(tmp_path))


def test_imagenet_refuses_the_cifar_augmentation(tmp_path):
    with pytest.raises(ValueError, match="its own preprocessing"):
        open_source("imagenet2012", data_dir=str(tmp_path), augment="crop_flip")
