#!/usr/bin/env python3
"""Makes Skyward's AWS on-demand price table from AWS's price list.

EC2's own API has no on-demand prices. AWS publishes them as a price list per region, a CSV
of every price of every product; this keeps the Linux, shared-tenancy, no-license,
no-preinstalled-software on-demand hourly price of each instance type, per region, and
writes the table `--provider-opt aws.price_table=FILE` takes:

    scripts/aws-prices.py \
        https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/us-east-1/index.csv \
        https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/eu-west-1/index.csv \
        > aws-prices.csv
    skyward offers --provider aws --provider-opt aws.price_table=aws-prices.csv

Each SOURCE is a URL or a file already downloaded (one region's list is a few hundred MB; it
is read as a stream). The table's as-of date is the oldest publication date among them.
"""

import argparse
import csv
import decimal
import io
import sys
import urllib.request

# The columns kept, and the values a plain on-demand Linux instance has in them.
WANTED = {
    "TermType": "OnDemand",
    "Unit": "Hrs",
    "Currency": "USD",
    "Product Family": "Compute Instance",
    "Operating System": "Linux",
    "Tenancy": "Shared",
    "Pre Installed S/W": "NA",
    "CapacityStatus": "Used",
    "License Model": "No License required",
}
NEEDED = ["Instance Type", "PricePerUnit", "Region Code", *WANTED]


class Refusal(Exception):
    pass


def open_source(source):
    if source.startswith(("https://", "http://")):
        return io.TextIOWrapper(urllib.request.urlopen(source), encoding="utf-8", newline="")
    return open(source, encoding="utf-8", newline="")


def read_list(source, prices):
    """Adds the source's prices to `prices` {(region, type): usd}; returns its publication date."""
    published = None
    with open_source(source) as stream:
        rows = csv.reader(stream)
        # A few "Name","value" lines of metadata come before the header row.
        for row in rows:
            if row[:1] == ["Publication Date"] and len(row) > 1:
                published = row[1][:10]
            if row[:1] == ["SKU"]:
                header = row
                break
        else:
            raise Refusal(f"{source}: no header row (\"SKU\",...): is it an AWS price list CSV?")
        missing = [name for name in NEEDED if name not in header]
        if missing:
            raise Refusal(f"{source}: the price list has no column {', '.join(missing)}")
        if published is None:
            raise Refusal(f"{source}: no \"Publication Date\" line before the header")
        at = {name: header.index(name) for name in NEEDED}
        for row in rows:
            if len(row) < len(header):
                continue
            if any(row[at[name]] != value for name, value in WANTED.items()):
                continue
            try:
                usd = decimal.Decimal(row[at["PricePerUnit"]])
            except decimal.InvalidOperation:
                continue
            region, kind = row[at["Region Code"]], row[at["Instance Type"]]
            if region and kind and usd.is_finite() and usd > 0:
                prices[(region, kind)] = usd
    return published


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="a price list CSV: URL or file")
    args = parser.parse_args()
    prices = {}
    try:
        dates = [read_list(source, prices) for source in args.sources]
    except (Refusal, OSError, csv.Error, UnicodeDecodeError) as error:
        print(f"aws-prices: {error}", file=sys.stderr)
        return 1
    if not prices:
        print("aws-prices: no Linux on-demand instance prices in the sources", file=sys.stderr)
        return 1
    out = sys.stdout
    out.write("# AWS EC2 on-demand prices, Linux, shared tenancy, USD per instance-hour.\n")
    out.write(f"# as-of: {min(dates)}\n")
    out.write(f"# Made by scripts/aws-prices.py from: {' '.join(args.sources)}\n")
    out.write("instance_type,usd_per_hour,region\n")
    for (region, kind), usd in sorted(prices.items()):
        out.write(f"{kind},{usd.normalize():f},{region}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
