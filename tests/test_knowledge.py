"""Tests of medvqa.bamco.knowledge: the mining rule, the backends on small files, de-duplication, Table 1 on SLAKE."""
import json
from pathlib import Path

import pytest

import medvqa.bamco.knowledge as K
from medvqa.data.readers import VQARecord, load_split


def rec(question, answer, kind, image="img1", qtype=None, qid="1"):
    return VQARecord("toy", "train", qid, image, None, question, answer, kind, question_type=qtype)


@pytest.mark.parametrize("record, paper, released", [
    (rec("Does the picture contain the liver?", "Yes", "closed"), "Does the picture contain the liver?", "Does the picture contain the liver?"),
    (rec("Is there a mass?", "no", "closed"), None, None),
    (rec("Which is bigger, liver or spleen?", "Liver", "closed"), None, "Liver"),
    (rec("What organ is shown?", "Liver", "open"), "Liver", "Liver"),
    (rec("Where is the lesion?", "Left Lung", "open", qtype="Position"), "Left Lung", None),
    (rec("Is the heart enlarged?", "yes", "open"), "yes", "Is the heart enlarged?"),
])
def test_mining_rule(record, paper, released):
    assert K.mining_text(record, "paper") == paper
    assert K.mining_text(record, "released") == released


def write_kg(folder: Path, organ="organ#attribute#value\nLiver#definition#the largest gland\nLiver#function#detoxification\n"
             "Spleen#function#filters blood", disease="disease#attribute#value\nLiver Cancer#description#a malignant tumour of the liver\n"
             "Liver Cancer#location#Liver\nLiver Cancer#alias#hepatoma, HCC\nLiver Cancer#cause#Liver Cancer",
             rel="organ#attribute#value\nLiver#belong to#Digestive System"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "en_organ.csv").write_text(organ)
    (folder / "en_disease.csv").write_text(disease)
    (folder / "en_organ_rel.csv").write_text(rel)
    return folder


def test_graph_backend(tmp_path):
    kb = K.GraphKnowledgeBase(write_kg(tmp_path / "KG"))
    assert kb.definition("liver") == "the largest gland" and kb.definition("Spleen") is None
    assert kb.relations("Liver") == [("function", "detoxification"), ("belong to", "Digestive System")]
    assert kb.vocabulary()["hepatoma"] == "Liver Cancer" and kb.vocabulary()["hcc"] == "Liver Cancer"


def test_graph_backend_bad_files(tmp_path):
    with pytest.raises(K.KnowledgeFormatError, match=r"en_organ.csv, line 1: .*wrong delimiter"):
        K.GraphKnowledgeBase(write_kg(tmp_path / "a", organ="organ,attribute,value\nLiver,function,x"))
    with pytest.raises(K.KnowledgeFormatError, match=r"en_disease.csv, line 3: expected 3 '#'-separated fields, found 4"):
        K.GraphKnowledgeBase(write_kg(tmp_path / "b", disease="disease#attribute#value\nA#b#c\nA#b#c#d"))
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="en_organ.csv, en_disease.csv, en_organ_rel.csv"):
        K.GraphKnowledgeBase(tmp_path / "c")


def write_umls(folder: Path, extra_rel: str = ""):
    folder.mkdir(parents=True, exist_ok=True)
    conso = [  # CUI|LAT|TS|LUI|STT|SUI|ISPREF|AUI|SAUI|SCUI|SDUI|SAB|TTY|CODE|STR|SRL|SUPPRESS|CVF|
        "C0023884|ENG|P|L1|PF|S1|N|A1||||MSH|SY|D1|liver structure|0|N||",
        "C0023884|ENG|P|L1|PF|S2|Y|A2||||MSH|PT|D1|Liver|0|N||",
        "C0023884|FRE|P|L9|PF|S9|Y|A9||||MSHFRE|PT|D1|Foie|0|N||",
        "C0016658|ENG|P|L2|PF|S3|Y|A3||||MSH|PT|D2|Fracture|0|N||",
        "C0012238|ENG|P|L3|PF|S4|Y|A4||||MSH|PT|D3|Digestive System|0|N||",
    ]
    definitions = [  # CUI|AUI|ATUI|SATUI|SAB|DEF|SUPPRESS|CVF|
        "C0023884|A2|AT1||CSP|an organ (CSP wording)|N||",
        "C0023884|A2|AT2||NCI|a large glandular organ (NCI wording)|N||",
    ]
    relations = [  # CUI1|AUI1|STYPE1|REL|CUI2|AUI2|STYPE2|RELA|RUI|SRUI|SAB|SL|RG|DIR|SUPPRESS|CVF|
        # REL / RELA are the relation of CUI2 to CUI1 (UMLS Reference Manual): read each row from right to left
        "C0012238|A4|AUI|CHD|C0023884|A2|AUI|part_of|R1||MSH|MSH|||N||",  # liver part_of digestive system
        "C0023884|A2|AUI|PAR|C0012238|A4|AUI|has_part|R5||MSH|MSH|||N||",  # digestive system has_part liver
        "C0023884|A2|AUI|RO|C0016658|A3|AUI|mapped_to|R2||MSH|MSH|||N||",  # bookkeeping: dropped
        "C9999999|A8|AUI|RO|C0023884|A2|AUI|associated_with|R3||MSH|MSH|||N||",  # CUI1 has no name: dropped
        "C0023884|A2|AUI|RO|C0016658|A3|AUI||R6||MSH|MSH|||N||",  # no RELA: fracture related to liver
    ]
    (folder / "MRCONSO.RRF").write_text("\n".join(conso) + "\n")
    (folder / "MRDEF.RRF").write_text("\n".join(definitions) + "\n")
    (folder / "MRREL.RRF").write_text("\n".join(relations + ([extra_rel] if extra_rel else [])) + "\n")
    return folder


def test_umls_backend(tmp_path):
    kb = K.UMLSKnowledgeBase(write_umls(tmp_path / "umls"))
    assert kb.vocabulary()["liver structure"] == "Liver" and "foie" not in kb.vocabulary()
    assert kb.definition("LIVER") == "a large glandular organ (NCI wording)"  # NCI preferred over CSP
    assert kb.relations("liver structure") == [("part of", "Digestive System")]  # mapped_to and unknown CUIs dropped
    assert kb.relations("digestive system") == [("has part", "Liver")]  # the inverse row, read the same way
    assert kb.relations("fracture") == [("related to", "Liver")]  # REL phrase when RELA is empty
    assert kb.definition("Fracture") is None and kb.relations("unknown") == []


def test_umls_wrong_field_count(tmp_path):
    with pytest.raises(K.KnowledgeFormatError, match=r"MRREL.RRF, line 6: expected 16 '\|'-separated fields, found 3"):
        K.UMLSKnowledgeBase(write_umls(tmp_path / "u", extra_rel="C1|A|B|"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="MRCONSO.RRF, MRDEF.RRF, MRREL.RRF"):
        K.UMLSKnowledgeBase(tmp_path / "empty")


def test_vocabulary_extractor_longest_match_and_abbreviations(tmp_path):
    kb = K.GraphKnowledgeBase(write_kg(tmp_path / "KG"))
    extract = K.VocabularyExtractor(kb.vocabulary())
    assert extract(["Is there liver cancer (LC) here? The LC is large.", "HCC in the liver", "nothing"]) == \
        [["Liver Cancer"], ["Liver Cancer", "Liver"], []]
    assert extract.name.startswith("vocabulary-matcher")


def test_mining_deduplicates_and_reports(tmp_path):
    kb = K.GraphKnowledgeBase(write_kg(tmp_path / "KG"))
    records = [rec("Does the picture contain the liver?", "Yes", "closed", "a", qid="1"),
               rec("Is the liver visible?", "yes", "closed", "a", qid="2"),          # same image, same items
               rec("What is the disease?", "hepatoma", "open", "b", qid="3"),
               rec("Which organ is this?", "Spleen", "open", "c", qid="4"),        # no definition
               rec("Is there a mass?", "No", "closed", "d", qid="5")]              # not mined
    ks = K.mine_knowledge(records, kb, K.VocabularyExtractor(kb.vocabulary()), progress=False)
    assert sorted(i.text() for i in ks.items) == [
        "Liver Cancer [location] Liver", "Liver [belong to] Digestive System", "Liver [function] detoxification"]
    assert ks.images == {"Liver": ["a"], "Liver Cancer": ["b"]}
    assert ks.report["duplicates_removed"] == 2 and ks.report["removed_empty_or_self_tail"] == 1
    assert ks.report["entities_without_definition"] == {"Spleen": 1} and ks.report["mined_texts"] == 4
    assert ks.table1() == {"images": 2, "heads": 2, "tails": 3, "relations": 3, "items": 3, "raw_items": 5}
    assert ks.classes() == ["Liver", "Liver Cancer"]
    back = K.KnowledgeSet.load(ks.save(tmp_path / "k.json"))
    assert back.items == ks.items and back.images == ks.images


def test_table1_on_the_shared_slake_copy(shared_data):
    """Pinned after checking by hand: SLAKE train (English), SLAKE's KG, the offline vocabulary extractor."""
    kb = K.knowledge_base_for("slake")
    ks = K.mine_knowledge(load_split("slake", "train"), kb, K.VocabularyExtractor(kb.vocabulary()), progress=False)
    assert ks.table1() == {"images": 318, "heads": 19, "tails": 66, "relations": 15, "items": 1891, "raw_items": 3228}
    assert "Lung Cancer" in ks.images and ks.definitions["Lung Cancer"]


def test_synthetic_knowledge_is_long_tailed(synthetic_dir):
    kb = K.GraphKnowledgeBase(synthetic_dir / "KG", "synthetic-kg")
    ks = K.mine_knowledge(load_split("synthetic", "train", root=synthetic_dir), kb,
                          K.VocabularyExtractor(kb.vocabulary()), progress=False)
    sizes = [len(ks.images[h]) for h in ks.classes()]
    assert len(sizes) >= 12 and sizes[0] >= 5 * sizes[-1]
    assert all(ks.definitions[h] for h in ks.images)
