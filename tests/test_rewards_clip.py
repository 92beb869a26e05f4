"""CLIP-family rewards and ImageReward against the published computation, value for value.

Golden tests: on a fixed set of images (square and non-square, float and uint8-derived), the
pixels each reward feeds its model equal a re-implementation of the published preprocessing
written here from its formulas (<= 1e-6), and the score equals the published formula (logit scale,
normalisation, division constant, sign) applied to tiny models built from config, saved with
`save_pretrained` and loaded through the path a published checkpoint takes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval, CLIPConfig, CLIPModel

from common import reward_models
from common.reward_models import AESTHETIC_HEAD, IMAGEREWARD_HEAD, IMAGEREWARD_MEAN, IMAGEREWARD_STD, RewardHead
from common.rewards import MultiReward, parse_reward_spec
from tests.tiny_pipelines import WORDS, clip_tokenizer

PROMPTS = ["a red cat", "two blue dog"]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# the tiny checkpoint's own processor config: 32 px, and a mean/std unlike OpenAI's so that a
# reward reading the wrong constants shows
TINY_SIZE, TINY_MEAN, TINY_STD = 32, (0.5, 0.45, 0.4), (0.3, 0.28, 0.26)


def image_set():
    """Batches of two: float squares, float landscape and portrait (crop offsets 6 and 5.5, where
    rounding and flooring differ), a float image smaller than the model (upsampled), and an
    image already on the 8-bit grid (what a decoded PNG or a uint8 pipeline gives)."""
    generator = torch.Generator().manual_seed(0)
    floats = [torch.rand(2, 3, h, w, generator=generator) for h, w in ((48, 48), (40, 56), (60, 44), (20, 24))]
    uint8 = torch.randint(0, 256, (2, 3, 36, 52), generator=generator).float() / 255
    return floats + [uint8]


def normalise(array, mean, std):
    return (array - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


def triangle_matrix(in_size, out_size):
    """(out, in) weights of an antialiased bilinear resize (torchvision's Resize on a tensor, PIL's
    bilinear): a triangle filter widened by the scale when shrinking, centres at (i + 0.5)·scale.
    Scale, centres and tap offsets in float32, as torch (under torchvision) computes them: placed in
    float64 the taps move by up to 3e-6."""
    scale = np.float32(in_size) / np.float32(out_size)
    support, stretch = (scale, np.float32(1) / scale) if scale >= 1 else (np.float32(1), np.float32(1))
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = np.float32(scale * np.float32(i + 0.5))
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        offsets = (np.arange(lo, hi) - centre + np.float32(0.5)).astype(np.float32) * stretch
        taps = np.maximum(0.0, 1 - np.abs(offsets.astype(np.float64)))
        matrix[i, lo:hi] = taps / taps.sum()
    return matrix


def shortest_edge(height, width, size):
    return (size, int(size * width / height)) if height <= width else (int(size * height / width), size)


def published_clip_scorer_pixels(images, size, mean, std):
    """flow_grpo's ClipScorer: T.Resize(size) (bilinear, antialias) on the float tensor,
    T.CenterCrop(size) (offset int(round((n - c) / 2))), T.Normalize; in float64 here."""
    out = []
    for image in images.double().numpy():
        height, width = shortest_edge(*image.shape[1:], size)
        resized = np.einsum("oh,chw,pw->cop", triangle_matrix(image.shape[1], height), image,
                            triangle_matrix(image.shape[2], width))
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        out.append(normalise(resized[:, top:top + size, left:left + size], mean, std))
    return np.stack(out)


def uint8_pil(images):
    """The published (images * 255).round().clamp(0, 255) -> uint8 -> PIL."""
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def published_pil_crop_pixels(images, size, mean, std, offset):
    """CLIPImageProcessor of transformers 4.40 (offset (n - c) // 2) and ImageReward's torchvision
    transform on PIL (offset rounded): PIL bicubic on the uint8 image, crop, /255, normalise."""
    out = []
    for image in uint8_pil(images):
        height, width = shortest_edge(image.height, image.width, size)
        image = image.resize((width, height), Image.BICUBIC)
        top = (height - size) // 2 if offset == "floor" else int(round((height - size) / 2.0))
        left = (width - size) // 2 if offset == "floor" else int(round((width - size) / 2.0))
        array = np.asarray(image, dtype=np.float64)[top:top + size, left:left + size].transpose(2, 0, 1) / 255
        out.append(normalise(array, mean, std))
    return np.stack(out)


def published_hps_pixels(images, size):
    """HPS v2's ResizeMaxSize: longer side to `size` (sides round()ed), PIL bicubic, zero padding
    [pad_w // 2, pad_h // 2, rest], ToTensor, OpenAI mean/std."""
    out = []
    for image in uint8_pil(images):
        scale = size / max(image.height, image.width)
        height, width = round(image.height * scale), round(image.width * scale)
        array = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float64).transpose(2, 0, 1) / 255
        top, left = (size - height) // 2, (size - width) // 2
        padded = np.zeros((3, size, size))
        padded[:, top:top + height, left:left + width] = array
        out.append(normalise(padded, OPENAI_MEAN, OPENAI_STD))
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def save_tiny_clip(directory):
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=TINY_SIZE, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=16, logit_scale_init_value=float(np.log(100.0)))  # ViT-L/14's trained scale is exp(4.6052) = 100
    CLIPModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    # the legacy layout of openai/clip-vit-large-patch14's preprocessor_config.json (ints, not dicts)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": TINY_SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": TINY_MEAN, "image_std": TINY_STD,
        "resample": 3, "size": TINY_SIZE}))
    return directory


def test_clip_image_config_reads_legacy_and_current_layouts(tiny_clip_dir, tmp_path):
    assert reward_models.clip_image_config(tiny_clip_dir) == (TINY_SIZE, (TINY_SIZE, TINY_SIZE), TINY_MEAN, TINY_STD)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {
        "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}, "image_mean": list(OPENAI_MEAN),
        "image_std": list(OPENAI_STD), "image_processor_type": "CLIPImageProcessor"}}))  # laion CLIP-H's layout
    assert reward_models.clip_image_config(tmp_path) == (224, (224, 224), OPENAI_MEAN, OPENAI_STD)


def tiny_clip_outputs(directory, pixels, prompts):
    """The published scorers' forward pass: CLIPModel on given pixels and padded prompts."""
    model = CLIPModel.from_pretrained(directory).eval()
    tokens = clip_tokenizer()(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        return model, model(pixel_values=torch.from_numpy(pixels).float(), **tokens)


@pytest.mark.parametrize("batch", range(5))
def test_clipscore_pixels_and_score_are_the_published_ones(tiny_clip_dir, batch):
    images = image_set()[batch]
    fn = reward_models.clipscore_reward(tiny_clip_dir)
    expected = published_clip_scorer_pixels(images, TINY_SIZE, TINY_MEAN, TINY_STD)
    np.testing.assert_allclose(fn.pixels(images).numpy(), expected, rtol=0, atol=1e-6)
    _, outputs = tiny_clip_outputs(tiny_clip_dir, expected, PROMPTS)
    # published: logits_per_image.diagonal() / 30, i.e. exp(logit_scale)·cos / 30
    published = outputs.logits_per_image.diagonal().numpy() / 30
    np.testing.assert_allclose(fn(images, PROMPTS, [{}] * 2)["clipscore"], published, rtol=1e-5, atol=1e-6)


def test_clipscore_uses_the_float_image_unrounded(tiny_clip_dir):
    """The rounding the old preprocessing applied is not in the published one: half a grey level
    moves the pixels by 1/(2·255·std)."""
    images = image_set()[0]
    nudged = (images * 255).round() / 255 + 0.5 / 255
    fn = reward_models.clipscore_reward(tiny_clip_dir)
    change = (fn.pixels(nudged) - fn.pixels((images * 255).round() / 255)).abs()
    assert change.min() > 0.5 / 255 / max(TINY_STD) - 1e-6


@pytest.mark.parametrize("batch", range(5))
def test_image_similarity_pixels_and_score_are_the_published_ones(tiny_clip_dir, tmp_path, batch):
    images = image_set()[batch]
    references = image_set()[(batch + 1) % 5]
    path = tmp_path / "ref.png"
    uint8_pil(references[1:])[0].save(path)
    # a float tensor is taken as it is; a path (or PIL image, or uint8 array) goes through uint8 / 255
    metadata = [{"reference_image": references[0]}, {"image": str(path)}]
    fn = reward_models.image_similarity_reward(tiny_clip_dir)
    ours, refs = fn.pixels(images, metadata)
    expected = published_clip_scorer_pixels(images, TINY_SIZE, TINY_MEAN, TINY_STD)
    uint8_ref = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32)).permute(2, 0, 1)[None] / 255
    expected_refs = np.concatenate([published_clip_scorer_pixels(references[:1], TINY_SIZE, TINY_MEAN, TINY_STD),
                                    published_clip_scorer_pixels(uint8_ref, TINY_SIZE, TINY_MEAN, TINY_STD)])
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(refs.numpy(), expected_refs, rtol=0, atol=1e-6)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        a = model.get_image_features(pixel_values=torch.from_numpy(expected).float()).pooler_output
        b = model.get_image_features(pixel_values=torch.from_numpy(expected_refs).float()).pooler_output
    published = torch.nn.functional.cosine_similarity(a, b).numpy()
    np.testing.assert_allclose(fn(images, PROMPTS, metadata)["image_similarity"], published, rtol=1e-5, atol=1e-6)


def test_image_similarity_is_one_against_itself(tiny_clip_dir):
    images = image_set()[1]
    out = reward_models.image_similarity_reward(tiny_clip_dir)(images, PROMPTS, [{"image": im} for im in images])
    np.testing.assert_allclose(out["image_similarity"], [1.0, 1.0], atol=1e-5)


@pytest.mark.parametrize("batch", range(5))
def test_pickscore_pixels_and_score_are_the_published_ones(tiny_clip_dir, batch):
    images = image_set()[batch]
    fn = reward_models.pickscore_reward(tiny_clip_dir)
    expected = published_pil_crop_pixels(images, TINY_SIZE, TINY_MEAN, TINY_STD, offset="floor")
    np.testing.assert_allclose(fn.pixels(images).numpy(), expected, rtol=0, atol=1e-6)
    model, outputs = tiny_clip_outputs(tiny_clip_dir, expected, PROMPTS)
    cos = torch.nn.functional.cosine_similarity(outputs.image_embeds, outputs.text_embeds)
    published = (model.logit_scale.exp() * cos / 26).detach().numpy()  # PickScore: exp(logit_scale)·cos / 26
    np.testing.assert_allclose(fn(images, PROMPTS, [{}] * 2)["pickscore"], published, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", range(5))
def test_hpsv2_pixels_and_score_are_the_published_ones(tiny_clip_dir, batch):
    images = image_set()[batch]
    fn = reward_models.hpsv2_reward(tiny_clip_dir)
    expected = published_hps_pixels(images, TINY_SIZE)  # its own transform, not the directory's processor config
    np.testing.assert_allclose(fn.pixels(images).numpy(), expected, rtol=0, atol=1e-6)
    _, outputs = tiny_clip_outputs(tiny_clip_dir, expected, PROMPTS)
    published = torch.nn.functional.cosine_similarity(outputs.image_embeds, outputs.text_embeds).numpy()  # raw cosine
    np.testing.assert_allclose(fn(images, PROMPTS, [{}] * 2)["hpsv2"], published, rtol=1e-5, atol=1e-6)


def test_hpsv2_pads_where_the_old_preprocessing_cropped(tiny_clip_dir):
    """A landscape image keeps its whole width: the rows above and below it are black (the
    normalised value of 0), nothing is cut."""
    pixels = reward_models.hpsv2_reward(tiny_clip_dir).pixels(image_set()[1])  # 40x56 -> 23x32, padded 4 + 5
    black = torch.tensor([-m / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)])[None, :, None, None]
    torch.testing.assert_close(pixels[:, :, :4], black.expand(2, 3, 4, TINY_SIZE), rtol=0, atol=1e-6)
    torch.testing.assert_close(pixels[:, :, -5:], black.expand(2, 3, 5, TINY_SIZE), rtol=0, atol=1e-6)
    assert (pixels[:, :, 4:-5] != black).any(dim=1).all()


def aesthetic_dir(tiny_clip_dir, tmp_path):
    torch.manual_seed(1)
    head = RewardHead(16).eval()
    assert list(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    directory = tmp_path / "aesthetic"
    directory.mkdir()
    for item in tiny_clip_dir.iterdir():
        (directory / item.name).symlink_to(item)
    torch.save(head.state_dict(), directory / AESTHETIC_HEAD)  # the LAION file is a plain torch state dict
    return directory, head


@pytest.mark.parametrize("batch", range(5))
def test_aesthetic_pixels_and_score_are_the_published_ones(tiny_clip_dir, tmp_path, batch):
    images = image_set()[batch]
    directory, head = aesthetic_dir(tiny_clip_dir, tmp_path)
    fn = reward_models.aesthetic_reward(directory)
    expected = published_pil_crop_pixels(images, TINY_SIZE, TINY_MEAN, TINY_STD, offset="floor")
    np.testing.assert_allclose(fn.pixels(images).numpy(), expected, rtol=0, atol=1e-6)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        embed = model.get_image_features(pixel_values=torch.from_numpy(expected).float()).pooler_output
        published = head(embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)).squeeze(1).numpy()
    out = MultiReward(parse_reward_spec(f"aesthetic:{directory}=0"))(images, PROMPTS, [{}] * 2)
    np.testing.assert_allclose(out["aesthetic"], published, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["avg"], 0)  # weight 0: computed, logged, not counted


def test_aesthetic_without_its_head_fails_at_start_up(tiny_clip_dir):
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        MultiReward(parse_reward_spec(f"aesthetic:{tiny_clip_dir}"))


def bert_tokenizer(directory):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path))


def tiny_imagereward(directory):
    torch.manual_seed(2)
    tokenizer = bert_tokenizer(directory)
    config = BlipConfig(
        vision_config=dict(image_size=TINY_SIZE, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, encoder_hidden_size=32, max_position_embeddings=64),
        projection_dim=16)
    return BlipForImageTextRetrieval(config).eval(), RewardHead(32).eval(), tokenizer


def imagereward_dir(tmp_path):
    model, head, tokenizer = tiny_imagereward(tmp_path)
    directory = tmp_path / "imagereward"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_file(head.state_dict(), str(directory / IMAGEREWARD_HEAD))
    return directory, model, head, tokenizer


@pytest.mark.parametrize("batch", range(5))
def test_imagereward_pixels_and_score_are_the_published_ones(tmp_path, batch):
    images = image_set()[batch]
    directory, model, head, tokenizer = imagereward_dir(tmp_path)
    fn = reward_models.imagereward_reward(directory)
    # ImageReward's _transform: Resize(224, BICUBIC), CenterCrop(224) on PIL, ToTensor, CLIP mean/std
    expected = published_pil_crop_pixels(images, TINY_SIZE, OPENAI_MEAN, OPENAI_STD, offset="round")
    np.testing.assert_allclose(fn.pixels(images).numpy(), expected, rtol=0, atol=1e-6)
    # ImageReward.score per (prompt, image): BLIP text encoder cross-attending to the ViT states,
    # [CLS] -> MLP -> (r - mean) / std, prompts padded to 35 tokens
    published = []
    with torch.no_grad():
        for pixels, prompt in zip(torch.from_numpy(expected).float(), PROMPTS):
            tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            states = model.vision_model(pixel_values=pixels[None])[0]
            text = model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                      encoder_hidden_states=states).last_hidden_state
            published.append(((head(text[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).item())
    np.testing.assert_allclose(fn(images, PROMPTS, [{}] * 2)["imagereward"], published, rtol=1e-5, atol=1e-6)


def test_imagereward_crops_where_the_old_preprocessing_stretched(tmp_path):
    """Portrait 60x44 -> 43x32, then the centre 32 rows from row round(5.5) = 6: the pixels are
    those of a crop, not of the whole image squeezed to 32x32."""
    directory, *_ = imagereward_dir(tmp_path)
    images = image_set()[2]
    pixels = reward_models.imagereward_reward(directory).pixels(images)
    resized = uint8_pil(images)[0].resize((TINY_SIZE, 43), Image.BICUBIC)
    crop = np.asarray(resized, dtype=np.float64)[6:6 + TINY_SIZE].transpose(2, 0, 1) / 255
    np.testing.assert_allclose(pixels[0].numpy(), normalise(crop, OPENAI_MEAN, OPENAI_STD), rtol=0, atol=1e-6)


def test_convert_imagereward_checkpoint_round_trip(tmp_path, monkeypatch):
    """A checkpoint in the published LAVIS-style key layout (`blip.visual_encoder.blocks.0.attn.qkv`,
    `blip.text_encoder...`, `mlp.layers...`) converts to a directory the reward loads."""
    model, head, tokenizer = tiny_imagereward(tmp_path)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    published = {}
    inverse = [("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
               ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
               ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
               ("vision_model.encoder.layers.", "visual_encoder.blocks."), ("self_attn.projection", "attn.proj"),
               ("self_attn.qkv", "attn.qkv"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
               ("vision_model.post_layernorm.", "visual_encoder.norm.")]
    for key, value in model.state_dict().items():
        if key.startswith(("vision_model.", "text_encoder.")):
            for new, old in inverse:
                key = key.replace(new, old)
            published["blip." + key] = value
    published.update({"mlp." + k: v for k, v in head.state_dict().items()})
    published["blip.itm_head.weight"] = torch.zeros(2, 32)  # ignored
    torch.save(published, tmp_path / "ImageReward.pt")
    # convert_imagereward sets ImageReward's 224 px; the tiny model is 32 px
    monkeypatch.setattr(reward_models, "IMAGEREWARD_IMAGE_SIZE", TINY_SIZE)
    converted = reward_models.convert_imagereward(tmp_path / "ImageReward.pt", tmp_path / "converted", base=str(base))
    save_file(head.state_dict(), str(base / IMAGEREWARD_HEAD))  # the same weights, saved directly
    images = image_set()[1]
    ours = MultiReward(parse_reward_spec(f"imagereward:{converted}"))(images, PROMPTS, [{}] * 2)["imagereward"]
    direct = MultiReward(parse_reward_spec(f"imagereward:{base}"))(images, PROMPTS, [{}] * 2)["imagereward"]
    np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-6)
    del published["blip.text_encoder.embeddings.word_embeddings.weight"]
    torch.save(published, tmp_path / "broken.pt")
    with pytest.raises(KeyError, match="lacks 1 weights"):
        reward_models.convert_imagereward(tmp_path / "broken.pt", tmp_path / "broken", base=str(base))


def test_convert_hpsv2_from_the_open_clip_layout(tiny_clip_dir, tmp_path):
    """HPS v2.1 ships as an open_clip checkpoint; written in that layout (fused in_proj, `proj`
    matrices, `{"state_dict": ...}`), it converts back to the same scores."""
    hf = CLIPModel.from_pretrained(tiny_clip_dir).state_dict()
    open_clip = {"attn_mask": torch.zeros(77, 77)}
    names = {"vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
             "vision_model.embeddings.class_embedding": "visual.class_embedding",
             "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding", "logit_scale": "logit_scale"}
    for key, value in hf.items():
        if key in names:
            open_clip[names[key]] = value
        elif key in ("visual_projection.weight", "text_projection.weight"):
            open_clip["visual.proj" if key.startswith("visual") else "text_projection"] = value.t()
        elif ".encoder.layers." in key:
            tower, rest = key.split(".encoder.layers.")
            layer, name = rest.split(".", 1)
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{layer}."
            if name.startswith("self_attn.") and name[10] in "qkv" and name[11:17] == "_proj.":
                if name[10] == "q":
                    param = name.rsplit(".", 1)[1]
                    fused = [hf[f"{tower}.encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    open_clip[f"{prefix}attn.in_proj_{param}"] = torch.cat(fused)
                continue
            for new, old in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                name = name.replace(new, old)
            open_clip[prefix + name] = value
        elif "position_ids" not in key:
            old = {"vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm": "visual.ln_post",
                   "text_model.final_layer_norm": "ln_final"}[key.rsplit(".", 1)[0]]
            open_clip[f"{old}.{key.rsplit('.', 1)[1]}"] = value
    torch.save({"state_dict": open_clip, "epoch": 1}, tmp_path / "HPS_v2.1_compressed.pt")
    converted = reward_models.convert_hpsv2(tmp_path / "HPS_v2.1_compressed.pt", tmp_path / "hps", base=str(tiny_clip_dir))
    images = image_set()[0]
    ours = MultiReward(parse_reward_spec(f"hpsv2:{converted}"))(images, PROMPTS, [{}] * 2)["hpsv2"]
    direct = MultiReward(parse_reward_spec(f"hpsv2:{tiny_clip_dir}"))(images, PROMPTS, [{}] * 2)["hpsv2"]
    np.testing.assert_allclose(ours, direct, rtol=1e-5, atol=1e-6)
