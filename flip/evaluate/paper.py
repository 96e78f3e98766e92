"""Reference numbers from the FLIP paper (Wang et al., RecSys '24), Tables 2, 3 and 5: (AUC, logloss)."""

from __future__ import annotations

TABLE2 = {  # overall performance
    "movielens-1m": {
        "AFM": (0.8449, 0.3950), "PNN": (0.8546, 0.3946), "Wide&Deep": (0.8509, 0.3957), "DCN": (0.8509, 0.4056),
        "DeepFM": (0.8539, 0.3905), "xDeepFM": (0.8454, 0.3934), "AFN": (0.8525, 0.3868),
        "AutoInt": (0.8509, 0.4013), "DCNv2": (0.8548, 0.3893), "FLIP_ID": (0.8600, 0.3802),
        "CTR-BERT": (0.8304, 0.4131), "P5": (0.8304, 0.4173), "PTab": (0.8426, 0.4195), "FLIP_PLM": (0.8460, 0.4127),
        "CTRL": (0.8572, 0.3838), "MoRec": (0.8561, 0.3896), "FLIP": (0.8621, 0.3788),
    },
    "bookcrossing": {
        "AFM": (0.7946, 0.5116), "PNN": (0.7956, 0.5131), "Wide&Deep": (0.7951, 0.5116), "DCN": (0.7957, 0.5108),
        "DeepFM": (0.7947, 0.5122), "xDeepFM": (0.7953, 0.5108), "AFN": (0.7932, 0.5139),
        "AutoInt": (0.7953, 0.5118), "DCNv2": (0.7956, 0.5103), "FLIP_ID": (0.8030, 0.5043),
        "CTR-BERT": (0.7795, 0.5300), "P5": (0.7801, 0.5261), "PTab": (0.7880, 0.5384), "FLIP_PLM": (0.7924, 0.5304),
        "CTRL": (0.7985, 0.5101), "MoRec": (0.7990, 0.5087), "FLIP": (0.8061, 0.5004),
    },
    "goodreads": {
        "AFM": (0.7630, 0.5160), "PNN": (0.7725, 0.5055), "Wide&Deep": (0.7684, 0.5090), "DCN": (0.7693, 0.5086),
        "DeepFM": (0.7671, 0.5138), "xDeepFM": (0.7720, 0.5079), "AFN": (0.7654, 0.5118),
        "AutoInt": (0.7716, 0.5071), "DCNv2": (0.7724, 0.5057), "FLIP_ID": (0.7779, 0.5014),
        "CTR-BERT": (0.7385, 0.5316), "P5": (0.7365, 0.5336), "PTab": (0.7456, 0.5268), "FLIP_PLM": (0.7476, 0.5255),
        "CTRL": (0.7741, 0.5045), "MoRec": (0.7731, 0.5085), "FLIP": (0.7787, 0.5001),
    },
}

TABLE5_ML1M = {  # ablations (MovieLens-1M)
    "FLIP": (0.8621, 0.3788), "w/o MLM": (0.8610, 0.3791), "w/o MTM": (0.8615, 0.3806), "w/o ICL": (0.8618, 0.3790),
    "w/o MLM&MTM": (0.8598, 0.3815), "w/o MLM&MTM&ICL": (0.8593, 0.3810),
    "w/o Field-level Masking": (0.8605, 0.3785), "w/o Joint Reconstruction": (0.8618, 0.3820),
}

# our strategy / model names -> the paper's row names
STRATEGY_ROW = {"scratch": "DCNv2", "flip_id": "FLIP_ID", "flip_plm": "FLIP_PLM", "flip": "FLIP",
                "plm_scratch": "PLM finetuned without alignment"}
MODEL_ROW = {"afm": "AFM", "pnn": "PNN", "widedeep": "Wide&Deep", "dcn": "DCN", "deepfm": "DeepFM",
             "xdeepfm": "xDeepFM", "afn": "AFN", "autoint": "AutoInt", "dcnv2": "DCNv2"}
