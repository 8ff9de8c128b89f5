"""A Lambda function behind a Kinesis event source mapping (with
FunctionResponseTypes: ["ReportBatchItemFailures"]) that prints each event of each chunk.

Package it with the claimcheck wheel (pip install --target package/ claimcheck-*.whl) or as a
layer; boto3 comes with Lambda's Python runtime.
"""

import json

import claimcheck.lambda_


def handler(event, context):
    with claimcheck.lambda_.chunks(event) as batch:
        for chunk in batch:
            for e in chunk.events:
                print(json.dumps({"tag": e.tag, "time": e.time, "record": e.record}, default=str))
    return batch.response
