# Buckets, the EMR Serverless application and the IAM of the training job (least privilege).
#
#   lake      : Parquet datasets (written by ingest/validate on Airflow, read by the job)
#   registry  : published models (written by publish on Airflow; the job has no access)
#   artifacts : releases/ (job code and venv, read-only for the job), runs/ (per-run model and
#               metrics, written by the job), logs/ (EMR Serverless driver and executor logs)

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  buckets = {
    lake      = "${var.name_prefix}-lake-${local.account_id}"
    registry  = "${var.name_prefix}-registry-${local.account_id}"
    artifacts = "${var.name_prefix}-artifacts-${local.account_id}"
  }
  bucket_arn = { for key, name in local.buckets : key => "arn:${local.partition}:s3:::${name}" }
}

# --- Buckets: private, versioned, encrypted, TLS only. ---

resource "aws_s3_bucket" "this" {
  for_each = local.buckets
  bucket   = each.value
}

resource "aws_s3_bucket_ownership_controls" "this" {
  for_each = aws_s3_bucket.this
  bucket   = each.value.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each                = aws_s3_bucket.this
  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  for_each = aws_s3_bucket.this
  bucket   = each.value.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  for_each = aws_s3_bucket.this
  bucket   = each.value.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  for_each   = aws_s3_bucket.this
  bucket     = each.value.id
  depends_on = [aws_s3_bucket_versioning.this]
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

data "aws_iam_policy_document" "tls_only" {
  for_each = local.bucket_arn
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    resources = [each.value, "${each.value}/*"]
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  for_each   = aws_s3_bucket.this
  bucket     = each.value.id
  policy     = data.aws_iam_policy_document.tls_only[each.key].json
  depends_on = [aws_s3_bucket_public_access_block.this]
}

# --- EMR Serverless application. ---

resource "aws_emrserverless_application" "train" {
  name          = "${var.name_prefix}-train"
  release_label = var.emr_release_label
  type          = "spark"
  architecture  = "X86_64"

  maximum_capacity {
    cpu    = "${var.max_vcpu} vCPU"
    memory = "${var.max_memory_gb} GB"
  }

  auto_start_configuration {
    enabled = true
  }

  auto_stop_configuration {
    enabled              = true
    idle_timeout_minutes = 15
  }

  dynamic "image_configuration" {
    for_each = var.emr_serverless_image_uri == null ? [] : [var.emr_serverless_image_uri]
    content {
      image_uri = image_configuration.value
    }
  }

  dynamic "network_configuration" {
    for_each = length(var.subnet_ids) == 0 ? [] : [1]
    content {
      subnet_ids         = var.subnet_ids
      security_group_ids = var.security_group_ids
    }
  }
}

# Repository for the custom image; EMR Serverless pulls it with this policy.
resource "aws_ecr_repository" "emr_serverless_runtime" {
  name                 = "${var.name_prefix}/emr-serverless-runtime"
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
}

data "aws_iam_policy_document" "ecr_pull_by_emr_serverless" {
  statement {
    sid     = "EmrServerlessCustomImageSupport"
    effect  = "Allow"
    actions = ["ecr:BatchGetImage", "ecr:DescribeImages", "ecr:GetDownloadUrlForLayer"]
    principals {
      type        = "Service"
      identifiers = ["emr-serverless.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:emr-serverless:${var.region}:${local.account_id}:/applications/*"]
    }
  }
}

resource "aws_ecr_repository_policy" "emr_serverless_runtime" {
  repository = aws_ecr_repository.emr_serverless_runtime.name
  policy     = data.aws_iam_policy_document.ecr_pull_by_emr_serverless.json
}

# --- The job's execution role: read the lake and the released code, write runs and logs. ---

data "aws_iam_policy_document" "job_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["emr-serverless.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

data "aws_iam_policy_document" "job_access" {
  statement {
    sid       = "ListLakeAndArtifacts"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [local.bucket_arn.lake, local.bucket_arn.artifacts]
  }
  statement {
    sid     = "ReadDatasetsAndReleases"
    actions = ["s3:GetObject"]
    resources = [
      "${local.bucket_arn.lake}/*",
      "${local.bucket_arn.artifacts}/releases/*",
      "${local.bucket_arn.artifacts}/runs/*",
    ]
  }
  statement {
    sid     = "WriteRunsAndLogs"
    actions = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = [
      "${local.bucket_arn.artifacts}/runs/*",
      "${local.bucket_arn.artifacts}/logs/*",
    ]
  }
}

resource "aws_iam_policy" "job_access" {
  name        = "${var.name_prefix}-train-job-access"
  description = "S3 access of the ADMM training job (also attachable to an EMR on EC2 instance profile role)"
  policy      = data.aws_iam_policy_document.job_access.json
}

resource "aws_iam_role" "job" {
  name                 = "${var.name_prefix}-train"
  description          = "Runtime role of the ADMM training job on EMR Serverless"
  assume_role_policy   = data.aws_iam_policy_document.job_trust.json
  max_session_duration = 43200
}

resource "aws_iam_role_policy_attachment" "job_access" {
  role       = aws_iam_role.job.name
  policy_arn = aws_iam_policy.job_access.arn
}

# --- What Airflow's identity (aws_default) may do: submit and watch the job, run the other stages. ---
# Attach this policy to the role Airflow runs as; no user or access key is created here.

data "aws_iam_policy_document" "airflow" {
  statement {
    sid = "RunTrainingJobs"
    actions = [
      "emr-serverless:GetApplication",
      "emr-serverless:StartApplication",
      "emr-serverless:StartJobRun",
      "emr-serverless:GetJobRun",
      "emr-serverless:CancelJobRun",
      "emr-serverless:GetDashboardForJobRun",
    ]
    resources = [aws_emrserverless_application.train.arn, "${aws_emrserverless_application.train.arn}/jobruns/*"]
  }
  statement {
    sid       = "PassTheJobRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.job.arn]
    condition {
      test     = "StringLike"
      variable = "iam:PassedToService"
      values   = ["emr-serverless.amazonaws.com"]
    }
  }
  dynamic "statement" {
    for_each = length(var.emr_cluster_ids) == 0 ? [] : [1]
    content {
      sid = "RunStepsOnEmrClusters"
      actions = [
        "elasticmapreduce:AddJobFlowSteps",
        "elasticmapreduce:CancelSteps",
        "elasticmapreduce:DescribeCluster",
        "elasticmapreduce:DescribeStep",
        "elasticmapreduce:ListSteps",
      ]
      resources = [
        for id in var.emr_cluster_ids : "arn:${local.partition}:elasticmapreduce:${var.region}:${local.account_id}:cluster/${id}"
      ]
    }
  }
  statement {
    sid       = "ListPipelineBuckets"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = values(local.bucket_arn)
  }
  statement {
    sid       = "ReadWritePipelineObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = [for arn in values(local.bucket_arn) : "${arn}/*"]
  }
}

resource "aws_iam_policy" "airflow" {
  name        = "${var.name_prefix}-airflow"
  description = "Airflow (connection aws_default): run the ADMM pipeline stages and submit the training job"
  policy      = data.aws_iam_policy_document.airflow.json
}
