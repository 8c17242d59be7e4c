"""``vlm2rec-data features``: item features from frozen encoders, with a tiny random BERT-style
sentence-transformers model and a tiny random CLIP built from configs (offline)."""
import json

import numpy as np
import pytest
import torch

from dataset_tools.cli import main
from helpers import write_tiny_multimodal_dataset

pytest.importorskip("sentence_transformers")

NO_TEXT = "i5"  # an item whose every text field is blanked below
WORDS = ["alpha", "bravo", "charlie", "delta", "item", "number", "demo", "brand"] + [str(n) for n in range(10)]


def _tiny_sentence_encoder(path):
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    bert = path.parent / "bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = Tokenizer(WordPiece({word: n for n, word in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(bert)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(bert)
    word = models.Transformer(str(bert), max_seq_length=32)
    SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")]).save(str(path))
    return path


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=64, **small), vision_config=dict(image_size=32, patch_size=8, **small),
                         projection_dim=12)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return _tiny_sentence_encoder(root / "st"), _tiny_clip(root / "clip")


@pytest.fixture
def dataset(tmp_path):
    folder = write_tiny_multimodal_dataset(tmp_path / "data", broken_images=2)  # i0, i1: corrupt image files
    sidecar = folder / "tiny-mm.text.jsonl"
    records = [json.loads(line) for line in sidecar.read_text().splitlines()]
    for record in records:
        if record["item_id"] == NO_TEXT:
            record.update(title="", categories=[], description="", brand="")
    sidecar.write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_features_are_aligned_marked_and_read_by_vlm2recsasrec(tmp_path, dataset, encoders, capsys):
    st, clip = encoders
    prefix = tmp_path / "feat" / "mm"
    assert main(["features", "--data", str(dataset.parent), "--dataset", "tiny-mm", "--text-encoder", str(st),
                 "--image-encoder", str(clip), "--batch-size", "7", "--out", str(prefix), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"--feature_prefix={prefix}" in out and "text: 39 of 40 items, 1 absent" in out
    assert "image: 38 of 40 items, 2 absent" in out

    from recbole_vlm2rec.item_embeddings import load_item_embeddings

    text, text_meta = load_item_embeddings(f"{prefix}.text.npy")
    image, image_meta = load_item_embeddings(f"{prefix}.image.npy")
    tokens = [json.loads(line)["item_id"] for line in (dataset / "tiny-mm.text.jsonl").read_text().splitlines()]
    assert text_meta["item_tokens"] == tokens == image_meta["item_tokens"]
    assert text.shape == (40, 16) and image.shape == (40, 12)
    assert text_meta["masked_rows"] == [tokens.index(NO_TEXT)]
    assert image_meta["masked_rows"] == [tokens.index("i0"), tokens.index("i1")]
    present = np.linalg.norm(text, axis=1)
    assert np.allclose(np.delete(present, tokens.index(NO_TEXT)), 1.0, atol=1e-5)
    assert text_meta["dataset"] == "tiny-mm" and text_meta["encoders"]["text"]["name"] == str(st)
    assert text_meta["encoders"]["text"]["text_fields"] == ["title", "brand", "categories", "description"]
    assert image_meta["encoders"]["image"]["model_class"] == "CLIPModel"
    # items with the same title word are closer than items with different ones: the text was encoded, in order
    i0, i4, i1 = (text[tokens.index(t)] for t in ("i0", "i4", "i1"))  # i0, i4: "alpha ..."; i1: "bravo ..."
    assert i0 @ i4 > i0 @ i1

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation

    from recbole_vlm2rec.models.vlm2rec_sasrec import VLM2RecSASRec

    config = Config(model="VLM2RecSASRec", dataset="tiny-mm",
                    config_dict={"data_path": str(dataset.parent), "feature_prefix": str(prefix),
                                 "load_col": {"inter": ["user_id", "item_id", "timestamp"]}})
    train_data, _, _ = data_preparation(config, create_dataset(config))
    model = VLM2RecSASRec(config, train_data._dataset)
    assert model.modalities == ["text", "image"]
    ids = train_data._dataset.field2id_token["item_id"]
    assert not model.present_text[list(ids).index(NO_TEXT)] and not model.present_image[list(ids).index("i0")]
    assert int(model.present_image.sum()) == 38


def test_text_only_features_and_bad_input_give_clear_messages(tmp_path, dataset, encoders, capsys):
    st, _ = encoders
    assert main(["features", "--data", str(dataset.parent), "--dataset", "tiny-mm", "--text-encoder", str(st),
                 "--text-fields", "title", "--no-progress"]) == 0
    assert (dataset / "features" / "tiny-mm.text.npy").is_file()
    assert not (dataset / "features" / "tiny-mm.image.npy").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["features", "--data", str(dataset.parent), "--dataset", "tiny-mm", "--text-encoder", "nobody/no-model"])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "Cannot load the text encoder --text-encoder='nobody/no-model'" in message
    assert "huggingface-cli download nobody/no-model --local-dir" in message
    with pytest.raises(SystemExit):
        main(["features", "--data", str(dataset.parent), "--dataset", "tiny-mm", "--text-encoder", str(st),
              "--text-fields", "title,colour"])
    assert "choose one or more of" in capsys.readouterr().err
    assert main(["features", "--data", str(tmp_path), "--dataset", "nothing", "--text-encoder", str(st)]) == 1
    assert "no dataset directory" in capsys.readouterr().err
