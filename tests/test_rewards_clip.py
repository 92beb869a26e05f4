"""CLIP-family rewards and ImageReward on tiny models built from config, saved with
`save_pretrained` and loaded through the same path a published checkpoint takes."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import (BertTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor,
                          CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor)

from common import reward_models
from common.reward_models import AESTHETIC_HEAD, IMAGEREWARD_HEAD, IMAGEREWARD_MEAN, IMAGEREWARD_STD, RewardHead
from common.rewards import MultiReward, parse_reward_spec
from tests.tiny_pipelines import WORDS, clip_tokenizer

PROMPTS = ["a red cat", "two blue dog", "the dog on the left"]


def images(n=3, seed=0):
    return torch.rand(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=16, logit_scale_init_value=float(np.log(100.0)))  # ViT-L/14's trained scale is exp(4.6052) = 100
    directory = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(directory)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(directory)
    return directory


def reference_cosines(directory):
    """Image-text cosine computed independently with the reloaded model."""
    model, processor = CLIPModel.from_pretrained(directory).eval(), CLIPProcessor.from_pretrained(directory)
    pil = reward_models.to_pil(images())
    with torch.no_grad():
        out = model(**processor(text=PROMPTS, images=pil, padding=True, return_tensors="pt"))
    return out.logits_per_image.diagonal().numpy() / model.logit_scale.exp().item()


@pytest.mark.parametrize("name, scale", [("clipscore", 100 / 30), ("pickscore", 100 / 26), ("hpsv2", 1.0)])
def test_text_image_scores_and_their_published_scales(tiny_clip_dir, name, scale):
    out = MultiReward(parse_reward_spec(f"{name}:{tiny_clip_dir}=1"))(images(), PROMPTS, [{}] * 3)
    assert set(out) == {name, "avg"} and out[name].dtype == np.float32
    np.testing.assert_allclose(out[name], scale * reference_cosines(tiny_clip_dir), rtol=1e-4, atol=1e-5)


def test_aesthetic_loads_the_published_head_format(tiny_clip_dir, tmp_path):
    torch.manual_seed(1)
    head = RewardHead(16)
    assert list(head.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    directory = tmp_path / "aesthetic"
    directory.mkdir()
    for item in tiny_clip_dir.iterdir():
        (directory / item.name).symlink_to(item)
    torch.save(head.state_dict(), directory / AESTHETIC_HEAD)  # the LAION file is a plain torch state dict
    out = MultiReward(parse_reward_spec(f"aesthetic:{directory}=0"))(images(), PROMPTS, [{}] * 3)
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        embeds = model(**processor(text=PROMPTS, images=reward_models.to_pil(images()), padding=True,
                                   return_tensors="pt")).image_embeds  # L2-normalised
        expected = head.eval()(embeds).squeeze(1).numpy()
    np.testing.assert_allclose(out["aesthetic"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["avg"], 0)  # weight 0: computed, logged, not counted


def test_aesthetic_without_its_head_fails_at_start_up(tiny_clip_dir):
    with pytest.raises(FileNotFoundError, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        MultiReward(parse_reward_spec(f"aesthetic:{tiny_clip_dir}"))


def test_image_similarity_is_one_against_itself(tiny_clip_dir, tmp_path):
    batch = images()
    path = tmp_path / "ref.png"
    reward_models.to_pil(batch[2:3])[0].save(path)
    metadata = [{"reference_image": batch[0]}, {"reference_image": images(seed=5)[1]}, {"image": str(path)}]
    out = MultiReward(parse_reward_spec(f"image_similarity:{tiny_clip_dir}"))(batch, PROMPTS, metadata)["image_similarity"]
    assert out[0] == pytest.approx(1.0, abs=1e-5) and out[2] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= out[1] < 1 - 1e-4


def bert_tokenizer(directory):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    path = directory / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(path))


def tiny_imagereward(directory):
    torch.manual_seed(2)
    tokenizer = bert_tokenizer(directory)
    config = BlipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, encoder_hidden_size=32, max_position_embeddings=64),
        projection_dim=16)
    model = BlipForImageTextRetrieval(config).eval()
    head = RewardHead(32).eval()
    return model, head, tokenizer


def test_imagereward_matches_the_published_computation(tmp_path):
    model, head, tokenizer = tiny_imagereward(tmp_path)
    directory = tmp_path / "imagereward"
    model.save_pretrained(directory)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(directory)
    save_file(head.state_dict(), str(directory / IMAGEREWARD_HEAD))
    out = MultiReward(parse_reward_spec(f"imagereward:{directory}"))(images(), PROMPTS, [{}] * 3)["imagereward"]
    # the published score, one image at a time: BLIP text encoder cross-attending to the ViT
    # states, [CLS] -> MLP -> (r - mean) / std, prompts padded to 35 tokens
    processor = BlipProcessor.from_pretrained(directory)
    expected = []
    with torch.no_grad():
        for image, prompt in zip(reward_models.to_pil(images()), PROMPTS):
            tokens = processor(text=prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            assert tokens["input_ids"].shape[1] == 35
            states = model.vision_model(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"])[0]
            text = model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                      encoder_hidden_states=states).last_hidden_state
            expected.append(((head(text[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).item())
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(out, 5))) == 3  # depends on the image-prompt pair


def test_convert_imagereward_checkpoint_round_trip(tmp_path, monkeypatch):
    """A checkpoint in the published LAVIS-style key layout (`blip.visual_encoder.blocks.0.attn.qkv`,
    `blip.text_encoder...`, `mlp.layers...`) converts to a directory the reward loads."""
    model, head, tokenizer = tiny_imagereward(tmp_path)
    base = tmp_path / "base"
    model.save_pretrained(base)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(base)
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
    monkeypatch.setattr(reward_models, "IMAGEREWARD_IMAGE_SIZE", 32)
    converted = reward_models.convert_imagereward(tmp_path / "ImageReward.pt", tmp_path / "converted", base=str(base))
    save_file(head.state_dict(), str(base / IMAGEREWARD_HEAD))  # the same weights, saved directly
    ours = MultiReward(parse_reward_spec(f"imagereward:{converted}"))(images(), PROMPTS, [{}] * 3)["imagereward"]
    direct = MultiReward(parse_reward_spec(f"imagereward:{base}"))(images(), PROMPTS, [{}] * 3)["imagereward"]
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
    ours = MultiReward(parse_reward_spec(f"hpsv2:{converted}"))(images(), PROMPTS, [{}] * 3)["hpsv2"]
    np.testing.assert_allclose(ours, reference_cosines(tiny_clip_dir), rtol=1e-4, atol=1e-5)
