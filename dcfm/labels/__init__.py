"""From masks to labels and pictures: CVAT export with a review queue, overlay videos, contact sheets,
timelines and an HTML report, all read from a segment job's committed Parquet output (never recomputed).

    dcfm.labels.committed  committed videos and their frame rows, streamed in display order
    dcfm.labels.review     the review score: which frames most need a person
    dcfm.labels.cvat       `dcfm export cvat`: CVAT "Segmentation mask 1.1" (Pascal VOC) zips
    dcfm.labels.render     `dcfm render`: overlay MP4, contact sheet PNG, timeline PNG
    dcfm.labels.report     `dcfm report`: one self-contained HTML page
"""
